"""Loaders for the paper's data files: zsRE, FEVER, Wikitext self-samples, NQ, held-out text.

Files are read with the Hugging Face `datasets` library (json / text builders on local paths; no
hub). Each loader returns a `Loaded`: records in the schema `EditData.from_records` reads, and a
count of the rows it dropped, by reason.

Record schema (one dict per edit):
  zsRE (task seq2seq):  src (question), alt (new answer: one of the row's alternatives), rephrase
      (a filtered rephrase that is not the question itself), loc (another question), loc_ans (its
      answer), answers (the gold answers), pred (the file's model prediction).
  FEVER (task binary):  src (claim), alt (int edit label: the file's prediction, or with p = 0.5
      the flipped label alternatives[0]), rephrase (a filtered rephrase), loc (another claim),
      loc_ans (int: that claim's gold label), label (int gold label of src), pred (int),
      flipped (bool). SUPPORTS = 1, REFUTES = 0.
  Wikitext (task generation):  src (a self-sampled completion), n_tokens (its last n_tokens
      tokens are the edit target), original (the real text), loc (a held-out text).
Random choices (which alternative, which rephrase, whether to flip, which locality row) are
drawn from numpy generators seeded by (seed, line number), so they are fixed per row.

Locality: zsRE training pairs each question with another question of the same file (a seeded
single cycle, so never itself) and its first gold answer; for evaluation splits pass NQ pairs
(`load_nq`), as the official code does for validation. FEVER pairs each claim with another claim
and its own gold label. Wikitext pairs each edit with a held-out text (`load_texts`).

Malformed input, and what happens:
  * ValueError naming the file and line: bytes that are not UTF-8, a line that is not JSON or not
    a JSON object, a required field missing or of the wrong type (input/alternatives/
    filtered_rephrases/output; FEVER labels other than SUPPORTS/REFUTES; Wikitext n_tokens not a
    positive int, original/completions not equal-length lists of strings). A broken file is never
    read half-way in silence.
  * Dropped and counted (`Loaded.dropped`): rows the task cannot use although well-formed, as the
    official code drops them: no alternative ("no_alternative"), no rephrase left after removing
    the question itself and empty strings ("no_rephrase"), zsRE rows with no gold answer
    ("no_answer"), empty Wikitext completions ("empty"), held-out texts shorter than min_words or
    not ASCII ("short_or_non_ascii", the official filter), NQ pairs with an empty side ("empty").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

POSITIVE, NEGATIVE = "SUPPORTS", "REFUTES"
FEVER_LABELS = {POSITIVE: 1, NEGATIVE: 0}


@dataclasses.dataclass
class Loaded:
  """records: list of record dicts; dropped: reason -> number of rows dropped; path: the file."""

  records: list
  dropped: dict
  path: str

  def __len__(self):
    return len(self.records)

  def summary(self) -> str:
    """One line: the file, its records and the rows dropped by reason."""
    why = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
    return f"{self.path}: {len(self.records)} records (dropped: {why})"


# ---------------------------------------------------------------------------- reading files


def _locate_error(path: str, jsonl: bool) -> str | None:
  """The first malformed line of a (UTF-8 checked) JSON lines file, or the position of the error
  in a JSON file, as text; None if every line is a JSON object."""
  with open(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n") if jsonl else [raw]
  for i, line in enumerate(lines, 1):
    if jsonl and not line.strip():
      continue
    try:
      obj = json.loads(line.decode("utf-8"))
    except json.JSONDecodeError as e:
      return f"line {i if jsonl else e.lineno}: not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
      return f"line {i if jsonl else 1}: expected a JSON object, got {type(obj).__name__}"
  return None


def _check_utf8(path: str, raw: bytes) -> None:
  """Arrow may read invalid UTF-8 without complaint, so every file is checked first (fast, in C)."""
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
    raise ValueError(f"{path}: line {line}: bytes that are not UTF-8 ({e.reason} at byte {col} of the line)") from None


def _read_checked(path: str) -> bytes:
  """The bytes of a data file that exists and is valid UTF-8 (clear errors otherwise)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  _check_utf8(path, raw)
  return raw


def _load(builder: str, path: str, cache_dir: str | None):
  import datasets

  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  return datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", cache_dir=cache_dir)


def read_json_rows(path: str, cache_dir: str | None = None) -> list[tuple[int, dict]]:
  """(line number, row) for every row of a JSON lines file, read with `datasets`.

  Raises ValueError naming the file and the first bad line (non-UTF-8 bytes, bad JSON, not an
  object): the `datasets` loader's own errors do not say where. Rows whose fields Arrow cannot
  unify (a list on one line, a string on another) are read line by line instead, so the loaders'
  field checks report the line."""
  raw = _read_checked(path)
  lines = [i for i, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
  try:
    rows = _load("json", path, cache_dir).to_list()
  except Exception:  # pyarrow / datasets errors of many types; find the culprit ourselves
    where = _locate_error(path, jsonl=True)
    if where:
      raise ValueError(f"{path}: {where}") from None
    # Every line is a JSON object, but Arrow could not unify the columns (a field of one type on
    # one line and another type elsewhere): read the lines directly, so the field checks name it.
    return [(i, json.loads(raw.split(b"\n")[i - 1])) for i in lines]
  if len(lines) != len(rows):
    raise ValueError(f"{path}: {len(lines)} non-blank lines but {len(rows)} rows were read")
  return list(zip(lines, rows))


def read_json_object(path: str, cache_dir: str | None = None) -> dict:
  """A file holding one JSON object of columns (NQ, Wikitext self-samples), read with `datasets`
  (it yields the object as a single row). ValueError naming the file and line if malformed."""
  where = None
  _read_checked(path)
  try:
    ds = _load("json", path, cache_dir)
  except Exception as e:
    where = _locate_error(path, jsonl=False) or f"could not be read as JSON ({type(e).__name__}: {e})"
  if where is None and len(ds) != 1:
    where = f"expected one JSON object, read {len(ds)} rows"
  if where is not None:
    raise ValueError(f"{path}: {where}")
  return ds[0]


# ---------------------------------------------------------------------------- field checks


def _bad(path: str, line: int | str, msg: str) -> ValueError:
  return ValueError(f"{path}: line {line}: {msg}")


def _str(row: dict, key: str, path: str, line: int) -> str:
  v = row.get(key)
  if not isinstance(v, str) or not v.strip():
    raise _bad(path, line, f"field {key!r} must be a non-empty string, got {v!r}")
  return v.strip()


def _str_list(row: dict, key: str, path: str, line: int) -> list[str]:
  v = row.get(key)
  if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
    raise _bad(path, line, f"field {key!r} must be a list of strings, got {v!r}")
  return [x.strip() for x in v if x.strip()]


def _answers(row: dict, path: str, line: int) -> list[str]:
  out = row.get("output")
  if not isinstance(out, list) or not all(isinstance(o, dict) for o in out):
    raise _bad(path, line, f"field 'output' must be a list of objects, got {out!r}")
  return [o["answer"].strip() for o in out if isinstance(o.get("answer"), str) and o["answer"].strip()]


def _rng(seed: int, line: int) -> np.random.Generator:
  return np.random.default_rng([seed, line])


def _cycle(n: int, seed: int, what: str) -> np.ndarray:
  """partner[i] != i for all i: a seeded permutation read as one cycle."""
  if n < 2:
    raise ValueError(f"{what}: need at least 2 usable rows to pair each with another for locality, have {n}")
  order = np.random.default_rng([seed, 7]).permutation(n)
  partner = np.empty(n, np.int64)
  partner[order] = np.roll(order, -1)
  return partner


# ---------------------------------------------------------------------------- loaders


def load_zsre(path: str, seed: int = 0, nq: Sequence[tuple[str, str]] | None = None,
              cache_dir: str | None = None) -> Loaded:
  """zsRE QA rows (structured_zeroshot-{train,dev}-new_annotated_final.jsonl) -> records.

  Locality: another question of this file with its first gold answer, or, when `nq` (pairs from
  `load_nq`) is given, NQ pairs in a seeded order (the official validation setting)."""
  recs, dropped = [], collections.Counter()
  for line, row in read_json_rows(path, cache_dir):
    src = _str(row, "input", path, line)
    alts = _str_list(row, "alternatives", path, line)
    reph = [r for r in _str_list(row, "filtered_rephrases", path, line) if r != src]
    answers = _answers(row, path, line)
    pred = row.get("prediction")
    if not alts:
      dropped["no_alternative"] += 1
    elif not reph:
      dropped["no_rephrase"] += 1
    elif not answers:
      dropped["no_answer"] += 1
    else:
      rng = _rng(seed, line)
      recs.append({"src": src, "alt": alts[rng.integers(len(alts))], "rephrase": reph[rng.integers(len(reph))],
                   "answers": answers, "pred": pred.strip() if isinstance(pred, str) else None})
  if nq is None:
    partner = _cycle(len(recs), seed, path)
    for r, j in zip(recs, partner):
      r["loc"], r["loc_ans"] = recs[j]["src"], recs[j]["answers"][0]
  else:
    pair_locality(recs, nq, seed, path)
  return Loaded(recs, dict(dropped), path)


def pair_locality(records: list, pairs: Sequence[tuple[str, str]], seed: int = 0, what: str = "records") -> list:
  """Sets each record's loc/loc_ans to a (question, answer) pair, e.g. from NQ, in a seeded order
  (cycling if there are fewer pairs than records). Changes the records in place and returns them."""
  if not pairs:
    raise ValueError(f"{what}: the locality set is empty")
  order = np.random.default_rng([seed, 11]).permutation(len(pairs))
  for i, r in enumerate(records):
    r["loc"], r["loc_ans"] = pairs[order[i % len(pairs)]]
  return records


def load_nq(path: str, cache_dir: str | None = None) -> Loaded:
  """Natural Questions locality pairs: one JSON object {"questions": [str], "answers": [str]}
  (the official data/nq/{train,validation}.json). records: (question, answer) tuples."""
  obj = read_json_object(path, cache_dir)
  qs, ans = obj.get("questions"), obj.get("answers")
  if not isinstance(qs, list) or not isinstance(ans, list) or len(qs) != len(ans):
    raise ValueError(f"{path}: expected equal-length lists 'questions' and 'answers', got "
                     f"{type(qs).__name__} and {type(ans).__name__}")
  pairs, dropped = [], collections.Counter()
  for i, (q, a) in enumerate(zip(qs, ans)):
    if not isinstance(q, str) or not isinstance(a, str):
      raise ValueError(f"{path}: entry {i}: question and answer must be strings, got {q!r}, {a!r}")
    if q.strip() and a.strip():
      pairs.append((q.strip(), a.strip()))
    else:
      dropped["empty"] += 1
  return Loaded(pairs, dict(dropped), path)


def _fever_label(v: Any, what: str, path: str, line: int) -> int:
  if v not in FEVER_LABELS:
    raise _bad(path, line, f"{what} must be {POSITIVE!r} or {NEGATIVE!r}, got {v!r}")
  return FEVER_LABELS[v]


def load_fever(path: str, seed: int = 0, cache_dir: str | None = None) -> Loaded:
  """FEVER fact-checking rows (fever-{train,dev}-kilt.jsonl) -> binary records (see module doc).

  As the official code: the gold label is output[0].answer; the edit label keeps the file's
  prediction or, with p = 0.5, takes alternatives[0] (the flipped label); the rephrase is any
  filtered rephrase (the claim itself is not removed, as in the official code)."""
  recs, dropped = [], collections.Counter()
  for line, row in read_json_rows(path, cache_dir):
    src = _str(row, "input", path, line)
    out = row.get("output")
    if not isinstance(out, list) or not out or not isinstance(out[0], dict):
      raise _bad(path, line, f"field 'output' must be a non-empty list of objects, got {out!r}")
    label = _fever_label(out[0].get("answer"), "output[0].answer", path, line)
    pred = _fever_label(row.get("prediction"), "field 'prediction'", path, line)
    alts = _str_list(row, "alternatives", path, line)
    reph = _str_list(row, "filtered_rephrases", path, line)
    if not alts:
      dropped["no_alternative"] += 1
      continue
    if not reph:
      dropped["no_rephrase"] += 1
      continue
    flipped_label = _fever_label(alts[0], "alternatives[0]", path, line)
    rng = _rng(seed, line)
    flip = bool(rng.random() < 0.5)
    recs.append({"src": src, "alt": flipped_label if flip else pred, "rephrase": reph[rng.integers(len(reph))],
                 "label": label, "pred": pred, "flipped": flip})
  partner = _cycle(len(recs), seed, path)
  for r, j in zip(recs, partner):
    r["loc"], r["loc_ans"] = recs[j]["src"], recs[j]["label"]
  return Loaded(recs, dict(dropped), path)


def load_texts(path: str, min_words: int = 50, cache_dir: str | None = None) -> Loaded:
  """Held-out texts for Wikitext locality: a text file (one text a line, e.g. wikitext-103 raw;
  `datasets` "text" builder) or JSON lines with a "text" field. Keeps, as the official filter,
  texts of at least min_words space-separated words that are ASCII. records: strings."""
  if path.endswith((".json", ".jsonl")):
    rows = [(line, r.get("text")) for line, r in read_json_rows(path, cache_dir)]
  else:
    _read_checked(path)
    try:
      ds = _load("text", path, cache_dir)
    except Exception as e:
      raise ValueError(f"{path}: could not be read as text ({type(e).__name__}: {e})") from None
    rows = list(enumerate(ds["text"], 1))
  texts, dropped = [], collections.Counter()
  for line, t in rows:
    if not isinstance(t, str):
      raise _bad(path, line, f"field 'text' must be a string, got {t!r}")
    t = t.strip()
    if not t:
      continue  # blank lines separate wikitext paragraphs; not rows
    if len(t.split(" ")) < min_words or not t.isascii():
      dropped["short_or_non_ascii"] += 1
    else:
      texts.append(t)
  return Loaded(texts, dict(dropped), path)


def load_wiki_edits(path: str, loc_texts: Sequence[str], seed: int = 0, cache_dir: str | None = None) -> Loaded:
  """Wikitext self-samples (10token/data/self_sample/{train,valid}.json: one JSON object with
  n_tokens, original, completions) -> generation records; each gets a held-out text as locality,
  in a seeded order."""
  obj = read_json_object(path, cache_dir)
  n_tokens = obj.get("n_tokens")
  if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
    raise ValueError(f"{path}: 'n_tokens' must be a positive integer, got {n_tokens!r}")
  orig, comp = obj.get("original"), obj.get("completions")
  if not isinstance(orig, list) or not isinstance(comp, list) or len(orig) != len(comp):
    raise ValueError(f"{path}: expected equal-length lists 'original' and 'completions', got "
                     f"{type(orig).__name__} and {type(comp).__name__}")
  if not loc_texts:
    raise ValueError(f"{path}: no held-out locality texts")
  recs, dropped = [], collections.Counter()
  for i, (o, c) in enumerate(zip(orig, comp)):
    if not isinstance(c, str) or not isinstance(o, (str, type(None))):
      raise ValueError(f"{path}: entry {i}: 'completions' and 'original' must hold strings, got {c!r}")
    if not c.strip():
      dropped["empty"] += 1
      continue
    recs.append({"src": c, "n_tokens": n_tokens, "original": o})
  order = np.random.default_rng([seed, 13]).permutation(len(loc_texts))
  for i, r in enumerate(recs):
    r["loc"] = loc_texts[order[i % len(loc_texts)]]
  return Loaded(recs, dict(dropped), path)
