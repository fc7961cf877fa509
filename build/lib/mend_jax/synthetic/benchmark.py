"""The synthetic benchmark on disk: edit records, pretraining text, tokenizer, world.

`write_benchmark(out_dir, cfg)` writes, for the world `generate_world(cfg)`:

* ``pretrain.txt`` - every true fact in every phrasing, one sentence a line, for every subject
  (train, val and test), so a small base model can learn them all before any editing happens;
* ``train/val/test.jsonl`` - edit records in the zsRE-like format read by EasyEdit (``src``,
  ``answers``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``), with disjoint subjects across the
  splits;
* ``tokenizer/`` - a word-level tokenizer in which every invented word is a single token,
  loadable with ``transformers.AutoTokenizer``;
* ``world.json`` - the config and the world, written last: its presence with a matching config
  marks a finished, reusable benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mend_jax import report
from mend_jax.synthetic.world import (
  FORMAT_VERSION,
  SPLITS,
  World,
  WorldConfig,
  config_to_dict,
  fact_sentence,
  generate_world,
  iter_facts,
  make_records,
  world_from_json,
  world_to_json,
)

EOS_TOKEN = "<|endoftext|>"  # bos, eos and pad, as in GPT-2
UNK_TOKEN = "<unk>"
# Tokens: a possessive 's, a run of word characters, or a run of punctuation.
_PRETOKENIZE_PATTERN = r"'s(?!\w)|\w+|[^\w\s]+"


def load_world(data_dir: str | os.PathLike) -> World:
  """Read ``{data_dir}/world.json`` written by :func:`write_benchmark`."""
  path = Path(data_dir) / "world.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; run write_benchmark({str(data_dir)!r}) first")
  with open(path, encoding="utf-8") as f:
    return world_from_json(json.load(f))


def _jsonl(records: Iterable[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def load_records(path: str | os.PathLike) -> list[dict]:
  """Read a JSONL file of edit records (blank lines are skipped).

  Raises ValueError naming the file and the 1-based line of a row that is
  not valid JSON or not a JSON object.
  """
  path = Path(path)
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}): {line.strip()[:80]!r}") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      records.append(row)
  return records


def train_tokenizer(pretrain_path: str | os.PathLike, out_dir: str | os.PathLike):
  """Train a word-level tokenizer on ``pretrain_path`` and save it to ``out_dir``.

  Every whitespace/punctuation-separated word becomes one token, so every
  invented name is a single token and ``tok(" X") == tok("X")``. Special
  tokens: ``<|endoftext|>`` (bos = eos = pad, id 0) and ``<unk>`` (id 1).
  Nothing is added automatically around the text (like GPT-2), so callers
  prepend bos themselves. Returns the ``PreTrainedTokenizerFast``.
  """
  tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
  # Like pre_tokenizers.Whitespace (words, punctuation runs) but keeping the
  # possessive "'s" as one token: the decoder can only glue it back whole.
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="removed", invert=True)
  # WordPiece's decoder joins tokens with spaces and then, token by token,
  # drops the space before "?", ",", "'s", ... so decoded text reads like the input.
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
  trainer = trainers.WordLevelTrainer(
    special_tokens=[EOS_TOKEN, UNK_TOKEN], min_frequency=1, show_progress=False)
  tok.train([str(pretrain_path)], trainer)
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=EOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=EOS_TOKEN,
    unk_token=UNK_TOKEN,
    # The decoder already cleans up; a second pass would only risk surprises.
    clean_up_tokenization_spaces=False,
    # As GPT-2: no token_type_ids, which Flax GPT-2's __call__ would reject.
    model_input_names=["input_ids", "attention_mask"],
  )
  fast.save_pretrained(str(out_dir))
  return fast


def _check_tokenizer(tok, world: World, sentences: Sequence[str]) -> None:
  """Raise RuntimeError if an invented word is not one token or a sentence does not round-trip."""
  words = {o for pool in world.objects.values() for o in pool}
  words |= {w for s in world.subjects for w in s.split()}
  for w in sorted(words):
    for text in (w, " " + w):
      ids = tok(text, add_special_tokens=False)["input_ids"]
      if len(ids) != 1 or ids[0] == tok.unk_token_id:
        raise RuntimeError(f"tokenizer: {text!r} -> {ids}, expected one known token")
  enc = tok(list(sentences), add_special_tokens=False)["input_ids"]
  for sent, ids in zip(sentences, enc):
    if tok.unk_token_id in ids:
      raise RuntimeError(f"tokenizer: {sent!r} contains an unknown token")
    back = tok.decode(ids)
    if back != sent:
      raise RuntimeError(f"tokenizer: decode does not round-trip: {sent!r} -> {back!r}")


def _benchmark_paths(out_dir: Path) -> dict[str, Path]:
  paths = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
  paths["pretrain"] = out_dir / "pretrain.txt"
  paths["tokenizer"] = out_dir / "tokenizer"
  paths["world"] = out_dir / "world.json"
  return paths


def _cache_is_valid(paths: dict[str, Path], cfg: WorldConfig) -> bool:
  """True when every file exists and world.json records exactly ``cfg``."""
  if not all(p.exists() for p in paths.values()):
    return False
  if not (paths["tokenizer"] / "tokenizer.json").is_file():
    return False
  try:
    with open(paths["world"], encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return saved.get("format_version") == FORMAT_VERSION and saved.get("config") == config_to_dict(cfg)


def write_benchmark(out_dir: str | os.PathLike, cfg: WorldConfig = WorldConfig()) -> dict[str, Path]:
  """Generate (or reuse) the benchmark for ``cfg`` in ``out_dir``.

  Writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (edit records),
  ``pretrain.txt`` (every fact x every template, all splits),
  ``tokenizer/`` and finally ``world.json``. If ``world.json`` already
  records the same config and all files exist, nothing is rewritten.
  Every file is written atomically, and world.json (the completion marker)
  is removed first and written last, so an interrupted run is redone.

  Returns {"train", "val", "test", "pretrain", "tokenizer", "world"} -> Path.
  """
  out_dir = Path(out_dir)
  paths = _benchmark_paths(out_dir)
  if _cache_is_valid(paths, cfg):
    return paths

  world = generate_world(cfg)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths["world"].unlink(missing_ok=True)  # invalidate before touching anything else

  for split in SPLITS:
    report.atomic_write_text(paths[split], _jsonl(make_records(world, split)))
  sentences = [fact_sentence(f.prompt, f.target) for f in iter_facts(world)]
  report.atomic_write_text(paths["pretrain"], "".join(s + "\n" for s in sentences))

  # Directories cannot be os.replace'd over a non-empty one: build aside, swap.
  tmp_tok = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tokenizer."))
  try:
    tok = train_tokenizer(paths["pretrain"], tmp_tok)
    _check_tokenizer(tok, world, sentences)
    os.chmod(tmp_tok, 0o755)  # mkdtemp makes 0700
    if paths["tokenizer"].exists():
      shutil.rmtree(paths["tokenizer"])
    os.replace(tmp_tok, paths["tokenizer"])
  finally:
    if tmp_tok.exists():
      shutil.rmtree(tmp_tok)

  report.atomic_write_text(paths["world"], json.dumps(world_to_json(world), indent=1, sort_keys=True) + "\n")
  return paths
