"""The synthetic benchmark on disk: identical files for one config, valid records, a tokenizer
with one token per invented word, caching and regeneration, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mend_jax.synthetic import benchmark
from mend_jax.synthetic import world as W
from mend_jax.synthetic.world import WorldConfig

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
  return out, benchmark.write_benchmark(out, TINY)


def test_same_seed_gives_identical_files(tmp_path):
  a = benchmark.write_benchmark(tmp_path / "a", TINY)
  b = benchmark.write_benchmark(tmp_path / "b", TINY)
  fa, fb = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
  assert set(fa) == set(fb)
  expected = {"train.jsonl", "val.jsonl", "test.jsonl", "pretrain.txt", "world.json", "tokenizer/tokenizer.json"}
  assert expected <= set(fa)
  for name in fa:
    assert fa[name] == fb[name], name
  assert set(a) == set(b) == {"train", "val", "test", "pretrain", "tokenizer", "world"}


def test_records_are_valid(bench):
  out, paths = bench
  world = benchmark.load_world(out)
  for split in W.SPLITS:
    records = benchmark.load_records(paths[split])
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
      assert r["src"] == W.render_prompt(rel.templates[r["src_template"]], r["subject"])
      assert r["rephrase"] == W.render_prompt(rel.templates[r["rephrase_template"]], r["subject"])
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
  world = benchmark.load_world(out)
  lines = paths["pretrain"].read_text(encoding="utf-8").splitlines()
  expected = [W.fact_sentence(f.prompt, f.target) for f in W.iter_facts(world)]
  assert lines == expected
  assert len(lines) == TINY.n_subjects * sum(len(r.templates) for r in TINY.relations)


def test_tokenizer_single_tokens_and_round_trip(bench):
  out, paths = bench
  world = benchmark.load_world(out)
  tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  assert tok.eos_token == tok.bos_token == tok.pad_token == benchmark.EOS_TOKEN
  assert tok.unk_token == benchmark.UNK_TOKEN and tok.unk_token_id != tok.eos_token_id
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
  rec = benchmark.load_records(paths["train"])[0]
  full = tok(rec["src"] + " " + rec["alt"])["input_ids"]
  assert full == tok(rec["src"])["input_ids"] + tok(" " + rec["alt"])["input_ids"]


def test_cache_is_reused_and_config_change_regenerates(tmp_path):
  paths = benchmark.write_benchmark(tmp_path, TINY)
  before = _mtimes(paths)
  again = benchmark.write_benchmark(tmp_path, TINY)
  assert again == paths
  assert _mtimes(again) == before  # nothing rewritten

  other = WorldConfig(seed=TINY.seed + 1, n_subjects=20, n_objects_per_relation=6)
  benchmark.write_benchmark(tmp_path, other)
  after = _mtimes(paths)
  assert all(after[k] != before[k] for k in before if k.endswith((".jsonl", ".txt", "world.json")))
  saved = json.loads(paths["world"].read_text(encoding="utf-8"))
  assert saved["config"] == W.config_to_dict(other)
  assert benchmark.load_world(tmp_path).subjects == W.generate_world(other).subjects


def test_missing_marker_triggers_regeneration(tmp_path):
  paths = benchmark.write_benchmark(tmp_path, TINY)
  before = paths["train"].stat().st_mtime_ns
  paths["world"].unlink()  # as if the run was interrupted before the last write
  benchmark.write_benchmark(tmp_path, TINY)
  assert paths["world"].is_file() and paths["train"].stat().st_mtime_ns != before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_records_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"src": "a"}\n\n{"src": "b", oops}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
    benchmark.load_records(path)
  path.write_text('{"src": "a"}\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
    benchmark.load_records(path)


def test_load_records_names_the_line_of_bytes_that_are_not_utf8(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"src": "a"}\n{"src": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: bytes that are not UTF-8"):
    benchmark.load_records(path)
