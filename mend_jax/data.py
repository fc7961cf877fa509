"""Prompt/target records to fixed-shape causal-LM batches, and per-step sampling.

A record (zsRE-like, the synthetic benchmark's format) has:
  src (edit prompt), alt (edit target), rephrase (paraphrase of src), loc (unrelated prompt),
  loc_ans (its answer), answers (the original answers).
For each record we build three examples, prompt + " " + target:
  edit  = (src, alt), equiv = (rephrase, alt), loc = (loc, loc_ans).
Tokens: [bos] + prompt + target, right-padded to `max_len`; labels are -100 except at the target
tokens (so the loss and edit success read the target only); `kl_mask` marks the positions that
predict the locality answer (the locality KL is taken there).

Batches are fixed-shape so that nothing recompiles; sampling at step s depends only on (seed, s),
so a resumed run sees exactly the data order of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """input_ids, attention_mask, labels, kl_mask: [N, max_len] int32 arrays."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  kl_mask: np.ndarray

  def take(self, idx) -> dict[str, np.ndarray]:
    return {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)}

  def __len__(self):
    return self.input_ids.shape[0]


def _bos(tokenizer) -> list[int]:
  b = tokenizer.bos_token_id
  return [] if b is None else [int(b)]


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], max_len: int,
                 what: str = "examples") -> Tokenized:
  """Tokenises prompt + " " + target pairs into one fixed-length causal-LM array set."""
  if len(prompts) != len(targets):
    raise ValueError(f"{what}: {len(prompts)} prompts but {len(targets)} targets")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  n = len(prompts)
  ids = np.full((n, max_len), pad if pad is not None else 0, np.int32)
  attn = np.zeros((n, max_len), np.int32)
  labels = np.full((n, max_len), IGNORE, np.int32)
  kl = np.zeros((n, max_len), np.int32)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    if not str(t).strip():
      raise ValueError(f"{what}[{i}]: the target for prompt {p!r} is empty")
    p_ids = _bos(tokenizer) + tokenizer.encode(str(p), add_special_tokens=False)
    t_ids = tokenizer.encode(" " + str(t).strip(), add_special_tokens=False)
    if not t_ids:
      raise ValueError(f"{what}[{i}]: the target {t!r} tokenises to nothing")
    seq = p_ids + t_ids
    if len(seq) > max_len:
      raise ValueError(
          f"{what}[{i}]: prompt + target is {len(seq)} tokens, longer than max_len={max_len} "
          f"(prompt {p!r}, target {t!r}); raise data.max_len (at most the model's context)")
    ids[i, : len(seq)] = seq
    attn[i, : len(seq)] = 1
    labels[i, len(p_ids): len(seq)] = t_ids
    kl[i, len(p_ids) - 1: len(seq) - 1] = 1  # the positions that predict the target tokens
  return Tokenized(ids, attn, labels, kl)


REQUIRED = ("src", "alt", "rephrase", "loc", "loc_ans")


@dataclasses.dataclass(frozen=True)
class EditData:
  """The tokenised views of a list of records, index-aligned."""

  edit: Tokenized
  equiv: Tokenized
  loc: Tokenized
  records: tuple

  def __len__(self):
    return len(self.records)

  @classmethod
  def from_records(cls, records: Sequence[Mapping], tokenizer, max_len: int, name: str = "records"):
    if not records:
      raise ValueError(f"{name}: no records")
    for i, r in enumerate(records):
      missing = [k for k in REQUIRED if k not in r or r[k] in (None, "")]
      if missing:
        raise ValueError(f"{name}[{i}]: missing or empty field(s) {missing}")
    col = lambda k: [r[k] for r in records]
    return cls(
        edit=encode_pairs(tokenizer, col("src"), col("alt"), max_len, f"{name} edit"),
        equiv=encode_pairs(tokenizer, col("rephrase"), col("alt"), max_len, f"{name} paraphrase"),
        loc=encode_pairs(tokenizer, col("loc"), col("loc_ans"), max_len, f"{name} locality"),
        records=tuple(records),
    )

  def batch(self, idx, loc_idx=None) -> dict[str, dict[str, np.ndarray]]:
    """{"edit", "equiv", "loc"} batches for the records at idx (locality rows loc_idx, default idx)."""
    loc_idx = idx if loc_idx is None else loc_idx
    return {"edit": self.edit.take(idx), "equiv": self.equiv.take(idx), "loc": self.loc.take(loc_idx)}

  def sample(self, seed: int, step: int, n_edits: int, n_loc: int):
    """The training batch of `step`: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    idx = rng.choice(len(self), size=n_edits, replace=len(self) < n_edits)
    loc_idx = rng.choice(len(self), size=n_loc, replace=len(self) < n_loc)
    return self.batch(idx, loc_idx)
