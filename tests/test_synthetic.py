"""Tests for the synthetic benchmark (mend_jax.synthetic) and its base model (mend_jax.pretrain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mend_jax import synthetic
from mend_jax.synthetic import WorldConfig

TINY = WorldConfig(seed=3, n_subjects=20, n_objects_per_relation=6)


def _all_files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(paths: dict[str, Path]) -> dict[str, int]:
  out = {}
  for name, p in paths.items():
    files = [p] if p.is_file() else sorted(p.rglob("*"))
    for f in files:
      out[str(f)] = f.stat().st_mtime_ns
  return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A tiny benchmark written once for the read-only tests."""
  out = tmp_path_factory.mktemp("bench")
  return out, synthetic.write_benchmark(out, TINY)


# --- determinism -----------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path):
  a = synthetic.write_benchmark(tmp_path / "a", TINY)
  b = synthetic.write_benchmark(tmp_path / "b", TINY)
  fa, fb = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
  assert set(fa) == set(fb)
  expected = {"train.jsonl", "val.jsonl", "test.jsonl", "pretrain.txt", "world.json", "tokenizer/tokenizer.json"}
  assert expected <= set(fa)
  for name in fa:
    assert fa[name] == fb[name], name
  assert set(a) == set(b) == {"train", "val", "test", "pretrain", "tokenizer", "world"}


def test_different_seed_gives_different_world():
  w0 = synthetic.generate_world(TINY)
  w1 = synthetic.generate_world(WorldConfig(seed=4, n_subjects=20, n_objects_per_relation=6))
  assert w0.subjects != w1.subjects
  assert w0.objects != w1.objects


def test_generate_world_shapes():
  w = synthetic.generate_world(TINY)
  assert len(w.subjects) == len(set(w.subjects)) == TINY.n_subjects
  for rel in TINY.relations:
    pool = w.objects[rel.name]
    assert len(pool) == len(set(pool)) == TINY.n_objects_per_relation
    assert all(len(o.split()) == 1 and o.isalpha() for o in pool)
  assert all(1 <= len(s.split()) <= 2 for s in w.subjects)
  # Every subject has a value for every relation, from that relation's pool.
  for s in w.subjects:
    assert set(w.facts[s]) == {r.name for r in TINY.relations}
    assert all(w.facts[s][r] in w.objects[r] for r in w.facts[s])
  # Every object is somebody's true value, so pretraining sees (and tokenizes) it.
  for rel in TINY.relations:
    assert {w.facts[s][rel.name] for s in w.subjects} == set(w.objects[rel.name])
  # No invented word is shared between pools or with a subject.
  words = [o for pool in w.objects.values() for o in pool] + [x for s in w.subjects for x in s.split()]
  assert len({x.lower() for x in words}) == len(words)


# --- splits and records -----------------------------------------------------


def test_splits_are_disjoint_and_cover_all_subjects():
  w = synthetic.generate_world(TINY)
  tr, va, te = (set(w.splits[k]) for k in synthetic.SPLITS)
  assert not (tr & va) and not (tr & te) and not (va & te)
  assert tr | va | te == set(w.subjects)
  assert len(tr) > len(te) > 0 and len(va) > 0


def test_records_are_valid(bench):
  out, paths = bench
  world = synthetic.load_world(out)
  for split in synthetic.SPLITS:
    records = synthetic.load_records(paths[split])
    subjects = set(world.splits[split])
    # One record per (subject, relation) of the split.
    assert sorted((r["subject"], r["relation"]) for r in records) == sorted(
      (s, rel.name) for s in subjects for rel in TINY.relations)
    for r in records:
      rel = world.relation(r["relation"])
      truth = world.facts[r["subject"]][r["relation"]]
      assert r["answers"] == [truth]
      assert r["alt"] != r["answers"][0] and r["alt"] in world.objects[r["relation"]]
      assert r["rephrase_template"] != r["src_template"]
      assert r["src"] == synthetic.render_prompt(rel.templates[r["src_template"]], r["subject"])
      assert r["rephrase"] == synthetic.render_prompt(rel.templates[r["rephrase_template"]], r["subject"])
      assert r["rephrase"] != r["src"]
      assert r["loc_subject"] != r["subject"] and r["loc_subject"] in subjects
      assert r["loc_ans"] == world.facts[r["loc_subject"]][r["loc_relation"]]
      assert r["loc_subject"] in r["loc"]
      for prompt in (r["src"], r["rephrase"], r["loc"]):
        assert prompt == prompt.strip() and r["subject" if prompt != r["loc"] else "loc_subject"] in prompt
      for target in (r["alt"], r["loc_ans"], *r["answers"]):
        assert len(target.split()) == 1


def test_pretrain_txt_has_every_fact_in_every_template(bench):
  out, paths = bench
  world = synthetic.load_world(out)
  lines = paths["pretrain"].read_text(encoding="utf-8").splitlines()
  expected = [synthetic.fact_sentence(f.prompt, f.target) for f in synthetic.iter_facts(world)]
  assert lines == expected
  assert len(lines) == TINY.n_subjects * sum(len(r.templates) for r in TINY.relations)


# --- tokenizer --------------------------------------------------------------


def test_tokenizer_single_tokens_and_round_trip(bench):
  from transformers import AutoTokenizer

  out, paths = bench
  world = synthetic.load_world(out)
  tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  assert tok.eos_token == tok.bos_token == tok.pad_token == synthetic.EOS_TOKEN
  assert tok.unk_token == synthetic.UNK_TOKEN and tok.unk_token_id != tok.eos_token_id
  for pool in world.objects.values():
    for o in pool:
      assert len(tok(o)["input_ids"]) == 1
      assert tok(" " + o)["input_ids"] == tok(o)["input_ids"] != [tok.unk_token_id]
  enc = tok("The capital of X is")
  assert set(enc) == {"input_ids", "attention_mask"}  # Flax GPT-2 takes no token_type_ids
  for line in paths["pretrain"].read_text(encoding="utf-8").splitlines():
    ids = tok(line)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == line
  # Prompt and target tokenize independently: the target is exactly the last token.
  rec = synthetic.load_records(paths["train"])[0]
  full = tok(rec["src"] + " " + rec["alt"])["input_ids"]
  assert full == tok(rec["src"])["input_ids"] + tok(" " + rec["alt"])["input_ids"]


# --- caching ---------------------------------------------------------------


def test_cache_is_reused_and_config_change_regenerates(tmp_path):
  paths = synthetic.write_benchmark(tmp_path, TINY)
  before = _mtimes(paths)
  again = synthetic.write_benchmark(tmp_path, TINY)
  assert again == paths
  assert _mtimes(again) == before  # nothing rewritten

  other = WorldConfig(seed=TINY.seed + 1, n_subjects=20, n_objects_per_relation=6)
  synthetic.write_benchmark(tmp_path, other)
  after = _mtimes(paths)
  assert all(after[k] != before[k] for k in before if k.endswith((".jsonl", ".txt", "world.json")))
  saved = json.loads(paths["world"].read_text(encoding="utf-8"))
  assert saved["config"] == synthetic.config_to_dict(other)
  assert synthetic.load_world(tmp_path).subjects == synthetic.generate_world(other).subjects


def test_missing_marker_triggers_regeneration(tmp_path):
  paths = synthetic.write_benchmark(tmp_path, TINY)
  before = paths["train"].stat().st_mtime_ns
  paths["world"].unlink()  # as if the run was interrupted before the last write
  synthetic.write_benchmark(tmp_path, TINY)
  assert paths["world"].is_file() and paths["train"].stat().st_mtime_ns != before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_config_round_trips_through_json():
  assert synthetic.config_from_dict(json.loads(json.dumps(synthetic.config_to_dict(TINY)))) == TINY


@pytest.mark.parametrize("kwargs, field", [
  ({"n_objects_per_relation": 1}, "n_objects_per_relation"),
  ({"n_subjects": 3}, "n_subjects"),
  ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
  ({"relations": (synthetic.Relation("r", ("{s} is", "{s} was ")),)}, "template"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    synthetic.generate_world(WorldConfig(**kwargs))


# --- load_records ------------------------------------------------------------


def test_load_records_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"src": "a"}\n\n{"src": "b", oops}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
    synthetic.load_records(path)
  path.write_text('{"src": "a"}\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
    synthetic.load_records(path)


# --- pretraining ------------------------------------------------------------


def test_pretrain_tiny_model_loads_and_learns(bench, tmp_path):
  import numpy as np
  from transformers import AutoTokenizer, FlaxGPT2LMHeadModel

  from mend_jax import pretrain as pt

  data_dir, _ = bench
  cfg = pt.PretrainConfig(n_layer=1, n_embd=32, n_head=2, batch_size=32, steps=40, warmup_steps=4,
                          learning_rate=3e-3, eval_batch_size=128)
  out = pt.pretrain(data_dir, tmp_path / "model", cfg, progress=False)
  done = json.loads((out / pt.DONE_FILE).read_text(encoding="utf-8"))
  m = done["metrics"]
  assert m["loss_last"] < m["loss_first"]
  assert 0.0 <= m["fact_accuracy"]["all"] <= 1.0 and m["fact_accuracy"]["n_facts"] == len(
    synthetic.iter_facts(synthetic.load_world(data_dir)))
  assert done["config"]["steps"] == 40

  model = FlaxGPT2LMHeadModel.from_pretrained(str(out))
  tok = AutoTokenizer.from_pretrained(str(out))
  assert model.config.vocab_size == len(tok) and model.config.n_layer == 1
  ids = np.array([[tok.bos_token_id] + tok("The capital of X is")["input_ids"]], dtype=np.int32)
  assert model(ids).logits.shape == (1, ids.shape[1], len(tok))

  # Second call with the same config is a cache hit: the marker is not rewritten.
  stamp = (out / pt.DONE_FILE).stat().st_mtime_ns
  pt.pretrain(data_dir, out, cfg, progress=False)
  assert (out / pt.DONE_FILE).stat().st_mtime_ns == stamp


def test_encode_texts_rejects_too_long(bench):
  from transformers import AutoTokenizer

  from mend_jax import pretrain as pt

  _, paths = bench
  tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  ids, mask = pt.encode_texts(tok, ["The capital of", "is"], seq_len=5)
  assert ids.shape == mask.shape == (2, 5)
  assert ids[0, 0] == tok.bos_token_id and mask[0].tolist() == [1, 1, 1, 1, 0]
  with pytest.raises(ValueError, match="seq_len=3"):
    pt.encode_texts(tok, ["The capital of"], seq_len=3)
