"""Loaders of the paper's data files against hand-written expected values; malformed files give
errors naming the file and line."""

import json

import numpy as np
import pytest

import paper_samples as S
from mend_jax.data import official as D


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return S.write_all(tmp_path_factory.mktemp("paper_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_cache"))


# ---------------------------------------------------------------------------- zsRE / NQ

BORN = {f"Where was {p} born?": c for p, c in zip(S.PEOPLE, S.CITIES)}


def test_zsre_records_and_drops(files, cache):
  out = D.load_zsre(files["zsre_train"], seed=0, cache_dir=cache)
  assert out.dropped == {"no_alternative": 1, "no_rephrase": 1}
  assert [r["src"] for r in out.records] == [f"Where was {p} born?" for p in S.PEOPLE[:8]]
  r = out.records[0]
  assert r["answers"] == ["Paris"] and r["pred"] == "Paris"
  assert r["alt"] in ("Rome", "Madrid")  # one of the row's alternatives
  # The question itself is removed from the rephrases; the other one is left.
  assert r["rephrase"] == "What is the birthplace of Ada Lovelace?"
  # Training locality: another question of the file, with its gold answer.
  for rec in out.records:
    assert rec["loc"] != rec["src"] and rec["loc"] in BORN and rec["loc_ans"] == BORN[rec["loc"]]
  # Deterministic from the seed.
  again = D.load_zsre(files["zsre_train"], seed=0, cache_dir=cache)
  assert again.records == out.records
  alts = {s: [r["alt"] for r in D.load_zsre(files["zsre_train"], seed=s, cache_dir=cache).records] for s in range(6)}
  assert len({tuple(a) for a in alts.values()}) > 1  # the seed does choose


def test_zsre_with_nq_locality(files, cache):
  nq = D.load_nq(files["nq"], cache_dir=cache)
  assert nq.dropped == {"empty": 1}
  assert nq.records[0] == ("Who wrote about Paris?", "Ada Lovelace")
  out = D.load_zsre(files["zsre_dev"], seed=0, nq=nq.records, cache_dir=cache)
  assert len(out) == 4
  pairs = dict(nq.records)
  for r in out.records:
    assert pairs[r["loc"]] == r["loc_ans"]


# ---------------------------------------------------------------------------- FEVER


def test_fever_records_labels_and_flips(files, cache):
  out = D.load_fever(files["fever_train"], seed=0, cache_dir=cache)
  assert out.dropped == {"no_rephrase": 1} and len(out) == 8
  # Row i: gold label SUPPORTS (1) for even i, prediction SUPPORTS for i in {0, 1, 4, 5}.
  assert [r["label"] for r in out.records] == [1, 0, 1, 0, 1, 0, 1, 0]
  assert [r["pred"] for r in out.records] == [1, 1, 0, 0, 1, 1, 0, 0]
  claim_label = {f"{p} lived in {c}.": 1 - (i % 2) for i, (p, c) in enumerate(zip(S.PEOPLE[:8], S.CITIES))}
  for r in out.records:
    assert r["alt"] == (1 - r["pred"] if r["flipped"] else r["pred"])
    assert r["loc"] != r["src"] and r["loc_ans"] == claim_label[r["loc"]]
  assert out.records[0]["rephrase"] == "Paris was home to Ada Lovelace."


def test_fever_flips_about_half(tmp_path, cache):
  path = S.write_jsonl(tmp_path / "fever-train-kilt.jsonl", [S.fever_row(i % 10) for i in range(300)])
  flips = [r["flipped"] for r in D.load_fever(path, seed=3, cache_dir=cache).records]
  assert 0.4 < np.mean(flips) < 0.6


# ---------------------------------------------------------------------------- Wikitext


def test_wiki_edits_and_texts(files, cache):
  texts = D.load_texts(files["loc_text"], min_words=5, cache_dir=cache)
  # Kept: the six 30-word lines; dropped: the heading, the short line and the non-ASCII one.
  assert len(texts) == 6 and texts.dropped == {"short_or_non_ascii": 3}
  assert texts.records[0] == S.text(0, 30)
  assert len(D.load_texts(files["loc_jsonl"], min_words=5, cache_dir=cache)) == 4
  out = D.load_wiki_edits(files["wiki_train"], texts.records, seed=0, cache_dir=cache)
  assert out.dropped == {"empty": 1} and len(out) == 8
  r = out.records[0]
  assert r["src"] == S.text(0) + " so it goes" and r["n_tokens"] == 3 and r["original"] == S.text(0)
  assert all(rec["loc"] in texts.records for rec in out.records)


# ---------------------------------------------------------------------------- malformed files

GOOD = json.dumps(S.zsre_row(0))


@pytest.mark.parametrize("line2, message", [
    ('{"input": "Where', "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({k: v for k, v in S.zsre_row(1).items() if k != "input"}), "line 2: field 'input'"),
    (json.dumps({**S.zsre_row(1), "alternatives": "Rome"}), "line 2: field 'alternatives'"),
    (json.dumps({**S.zsre_row(1), "output": "Rome"}), "line 2: field 'output'"),
])
def test_malformed_zsre_lines_name_file_and_line(tmp_path, cache, line2, message):
  path = S.write_jsonl(tmp_path / "zsre.jsonl", [GOOD, "", line2, GOOD])  # a blank line is skipped
  with pytest.raises(ValueError, match=f"zsre.jsonl: {message.replace('line 2', 'line 3')}"):
    D.load_zsre(path, cache_dir=cache)


def test_non_utf8_bytes_name_the_line(tmp_path, cache):
  path = tmp_path / "fever.jsonl"
  path.write_bytes(GOOD.encode() + b"\n" + b'{"input": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"fever.jsonl: line 2: bytes that are not UTF-8"):
    D.load_fever(str(path), cache_dir=cache)


def test_fever_bad_label_names_the_line(tmp_path, cache):
  bad = {**S.fever_row(1), "output": [{"answer": "NOT ENOUGH INFO"}]}
  path = S.write_jsonl(tmp_path / "fever.jsonl", [S.fever_row(0), bad])
  with pytest.raises(ValueError, match=r"fever.jsonl: line 2: output\[0\].answer must be 'SUPPORTS' or 'REFUTES'"):
    D.load_fever(path, cache_dir=cache)


def test_malformed_json_object_files(tmp_path, cache):
  p = tmp_path / "train.json"
  p.write_text('{"n_tokens": 3,\n "original": ["a"],\n "completions": ["a" "b"]}')
  with pytest.raises(ValueError, match=r"train.json: line 3: not valid JSON"):
    D.load_wiki_edits(str(p), ["text"], cache_dir=cache)
  bad_n = S.write_json(tmp_path / "n.json", {"n_tokens": 0, "original": ["a"], "completions": ["a b"]})
  with pytest.raises(ValueError, match=r"n.json: 'n_tokens' must be a positive integer"):
    D.load_wiki_edits(bad_n, ["text"], cache_dir=cache)
  uneven = S.write_json(tmp_path / "u.json", {"n_tokens": 1, "original": ["a"], "completions": ["a", "b"]})
  with pytest.raises(ValueError, match=r"u.json: expected equal-length lists"):
    D.load_wiki_edits(uneven, ["text"], cache_dir=cache)
  nq = S.write_json(tmp_path / "nq.json", {"questions": ["q?"], "answers": [["a"]]})
  with pytest.raises(ValueError, match=r"nq.json: entry 0: question and answer must be strings"):
    D.load_nq(nq, cache_dir=cache)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    D.load_zsre(str(tmp_path / "missing.jsonl"), cache_dir=cache)


def test_too_few_rows_for_locality(tmp_path, cache):
  path = S.write_jsonl(tmp_path / "one.jsonl", [S.zsre_row(0), S.zsre_row(1, alternatives=False)])
  with pytest.raises(ValueError, match="one.jsonl: need at least 2 usable rows"):
    D.load_zsre(path, cache_dir=cache)
