"""The user's own edit data for a causal LM: EasyEdit's and CounterFact's JSON formats and the
project's own records, read into the record schema of `data.batches.EditData.from_records`
(src, alt, rephrase, loc, loc_ans, answers, subject).

A file is a JSON list of objects or JSON lines (one object a line); the format is recognised per
row by its fields:
  EasyEdit:    prompt, target_new, ground_truth, rephrase_prompt, locality_prompt,
               locality_ground_truth, subject. Where EasyEdit allows a list (several rephrasings,
               several locality prompts with their answers, several ground truths) one element is
               picked per row, seeded by (seed, line).
  CounterFact: requested_rewrite {prompt (with "{}" for the subject), subject, target_new {str},
               target_true {str}}, paraphrase_prompts [...], neighborhood_prompts [...]. The edit
               is prompt.format(subject) -> target_new; the paraphrase one of paraphrase_prompts;
               locality one of neighborhood_prompts, whose answer is target_true (CounterFact's
               neighbourhood subjects share the true object).
  records:     src, alt, rephrase, loc, loc_ans (and optionally answers, subject).
A malformed row raises ValueError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Iterator

FORMATS = ("easyedit", "counterfact", "records")


def _items(path: str) -> Iterator[tuple[int, Any]]:
  """(line, object) of every item of a JSON list file or a JSON lines file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"edit data file {path!r} does not exist")
  raw = open(path, "rb").read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise ValueError(f"{path}: line {line}: bytes that are not UTF-8 ({e.reason})") from None
  stripped = text.lstrip()
  if stripped.startswith("["):
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
      while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
      if pos >= len(text):
        raise ValueError(f"{path}: line {text.count(chr(10), 0, pos) + 1}: the JSON list is not closed")
      if text[pos] == "]":
        return
      try:
        obj, end = decoder.raw_decode(text, pos)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
      yield text.count("\n", 0, pos) + 1, obj
      pos = end
  for i, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      yield i, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {i}: not valid JSON ({e.msg})") from None


def detect(row: Any) -> str | None:
  """The format a row is in (one of FORMATS), or None."""
  if not isinstance(row, dict):
    return None
  if "requested_rewrite" in row:
    return "counterfact"
  if "prompt" in row and "target_new" in row:
    return "easyedit"
  if "src" in row and "alt" in row:
    return "records"
  return None


class _Row:
  """Field access with errors that name the file, line and field."""

  def __init__(self, row: dict, path: str, line: int, rng: random.Random):
    self.row, self.path, self.line, self.rng = row, path, line, rng

  def bad(self, field: str, want: str, got: Any) -> ValueError:
    return ValueError(f"{self.path}: line {self.line}: field {field!r} must be {want}, got {got!r}")

  def text(self, field: str, value: Any = None, required: bool = True) -> str | None:
    v = self.row.get(field) if value is None else value
    if v is None and not required:
      return None
    if not isinstance(v, str) or not v.strip():
      raise self.bad(field, "a non-empty string", v)
    return v.strip()

  def one(self, field: str, required: bool = True) -> str | None:
    """A string, or one element (seeded) of a non-empty list of strings."""
    v = self.row.get(field)
    if v is None and not required:
      return None
    if isinstance(v, list):
      if not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise self.bad(field, "a non-empty string or a non-empty list of them", v)
      return v[self.rng.randrange(len(v))].strip()
    return self.text(field, v)


def _easyedit(r: _Row) -> dict:
  row = r.row
  loc_p, loc_a = row.get("locality_prompt"), row.get("locality_ground_truth")
  if isinstance(loc_p, list) or isinstance(loc_a, list):  # paired lists: one pair, seeded
    if not isinstance(loc_p, list) or not isinstance(loc_a, list) or len(loc_p) != len(loc_a) or not loc_p:
      raise r.bad("locality_ground_truth", f"a list as long as locality_prompt ({loc_p!r})", loc_a)
    j = r.rng.randrange(len(loc_p))
    loc, loc_ans = r.text("locality_prompt", loc_p[j]), r.text("locality_ground_truth", _first(loc_a[j]))
  else:
    loc, loc_ans = r.text("locality_prompt"), r.text("locality_ground_truth", _first(loc_a))
  truth = r.one("ground_truth", required=False)
  out = {"src": r.text("prompt"), "alt": r.one("target_new"), "rephrase": r.one("rephrase_prompt"),
         "loc": loc, "loc_ans": loc_ans, "answers": [truth] if truth else []}
  if row.get("subject") is not None:
    out["subject"] = r.text("subject")
  return out


def _first(v: Any) -> Any:
  """EasyEdit's locality answers may be a list of acceptable strings: the first."""
  return v[0] if isinstance(v, list) and v else v


def _counterfact(r: _Row) -> dict:
  rw = r.row.get("requested_rewrite")
  if not isinstance(rw, dict):
    raise r.bad("requested_rewrite", "an object", rw)
  prompt, subject = r.text("requested_rewrite.prompt", rw.get("prompt")), r.text("requested_rewrite.subject",
                                                                                 rw.get("subject"))
  if "{}" not in prompt:
    raise r.bad("requested_rewrite.prompt", "a string with '{}' where the subject goes", prompt)
  new, true = rw.get("target_new"), rw.get("target_true")
  new = r.text("requested_rewrite.target_new.str", new.get("str") if isinstance(new, dict) else new)
  true = r.text("requested_rewrite.target_true.str", true.get("str") if isinstance(true, dict) else true)
  return {"src": prompt.format(subject), "alt": new, "rephrase": r.one("paraphrase_prompts"),
          "loc": r.one("neighborhood_prompts"), "loc_ans": true, "answers": [true], "subject": subject}


def _records(r: _Row) -> dict:
  out = {k: r.text(k) for k in ("src", "alt", "rephrase", "loc", "loc_ans")}
  answers = r.row.get("answers", [])
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise r.bad("answers", "a list of strings", answers)
  out["answers"] = answers
  for k, v in r.row.items():  # keep the rest (subject, relation, ...) as it is
    out.setdefault(k, v)
  return out


READERS = {"easyedit": _easyedit, "counterfact": _counterfact, "records": _records}


def load_edits(path: str, seed: int = 0) -> list[dict]:
  """The records of an edit data file in any of FORMATS (module docstring)."""
  out = []
  for line, row in _items(path):
    fmt = detect(row)
    if fmt is None:
      what = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ValueError(f"{path}: line {line}: a row of an unknown format ({what}); expected EasyEdit's fields "
                       "(prompt, target_new, ...), CounterFact's (requested_rewrite, ...) or records (src, alt, ...)")
    out.append(READERS[fmt](_Row(row, path, line, random.Random(f"{seed}-{line}"))))
  if not out:
    raise ValueError(f"{path}: no edit rows")
  return out
