"""Prompt/target records to fixed-shape causal-LM batches, and per-step sampling.

A record (zsRE-like, the synthetic benchmark's format) has:
  src (edit prompt), alt (edit target), rephrase (paraphrase of src), loc (unrelated prompt),
  loc_ans (its answer), answers (the original answers).
For each record we build three examples, prompt + " " + target:
  edit  = (src, alt), equiv = (rephrase, alt), loc = (loc, loc_ans).
Tokens: [bos] + prompt + target, right-padded to `max_len`; labels are -100 except at the target
tokens (so the loss and edit success read the target only); `kl_mask` marks the positions that
predict the locality answer (the locality KL is taken there).

Other tasks (`EditData.from_records(task=...)`, the model's task): seq2seq (T5, BART) and binary
(BERT: alt and loc_ans are int labels in {0, 1}) read the same fields; "generation" (Wikitext, a
causal LM) reads src (a text whose last n_tokens tokens are the edit target), n_tokens and loc (a
held-out text). `encode_seq2seq`, `encode_binary`, `encode_continuations` and `encode_texts` say
which tokens each loss and metric reads.

Batches are fixed-shape so that nothing recompiles; sampling at step s depends only on (seed, s),
so a resumed run sees exactly the data order of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import logging

from mend_jax import models
from mend_jax.losses import IGNORE


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """input_ids, attention_mask, labels, kl_mask: [N, max_len] int32 arrays.

  By task (see `encode_seq2seq`, `encode_binary`): seq2seq adds decoder_input_ids and
  decoder_attention_mask [N, max_len] (labels and kl_mask are then over decoder positions);
  binary has labels [N] in {0, 1} and no kl_mask. hidden: the model's hidden state entering its
  lowest edited block for each row, if cached (`models.EditableModel.block_input`); a batch that
  carries it skips the blocks below. Fields that are None are left out of batches.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  kl_mask: np.ndarray | None = None
  decoder_input_ids: np.ndarray | None = None
  decoder_attention_mask: np.ndarray | None = None
  hidden: np.ndarray | None = None  # [N, T, D]: cached frozen activations (`EditData.with_cached_activations`)

  def take(self, idx) -> dict[str, np.ndarray]:
    """The rows idx as a batch dict, with read_pos/read_mask (see `read_positions`) for sequence
    targets; their width P is fixed per array set, so every batch of it has the same shapes."""
    out = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
           if getattr(self, f.name) is not None}
    if self._read is not None:
      out["read_pos"], out["read_mask"] = self._read[0][idx], self._read[1][idx]
    return out

  @functools.cached_property
  def _read(self):
    labels = getattr(self, "labels")
    if labels.ndim != 2:
      return None  # binary: one prediction per example
    return read_positions(labels, getattr(self, "kl_mask", None),
                          seq2seq=getattr(self, "decoder_input_ids", None) is not None)

  def __len__(self):
    return self.input_ids.shape[0]

  def rows(self, idx) -> "Tokenized":
    """The arrays of rows idx (in that order) as a Tokenized of their own."""
    idx = np.asarray(idx)
    return dataclasses.replace(self, **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                                        if getattr(self, f.name) is not None})


def read_positions(labels: np.ndarray, kl_mask: np.ndarray | None = None, seq2seq: bool = False):
  """The positions whose logits some loss or metric reads, per row: (read_pos, read_mask), [N,P].

  A position is read if it predicts a scored label (causal LM: labels[t+1] != -100; seq2seq:
  labels[t] != -100, decoder positions) or if kl_mask[t] is set (the locality KL reads it).
  P is the largest count over the rows (at least 1); shorter rows are padded with position 0 and
  read_mask 0. With batch["read_pos"] the model computes its vocabulary projection only there."""
  scored = labels != IGNORE
  if not seq2seq:
    scored = np.concatenate([scored[:, 1:], np.zeros_like(scored[:, :1])], axis=1)
  if kl_mask is not None:
    scored = scored | (kl_mask != 0)
  counts = scored.sum(1)
  p = max(int(counts.max(initial=0)), 1)
  # A stable sort puts the read positions first, in order.
  order = np.argsort(~scored, axis=1, kind="stable")[:, :p]
  mask = np.arange(p)[None, :] < counts[:, None]
  return np.where(mask, order, 0).astype(np.int32), mask.astype(np.int32)


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
    p_ids = models.bos_ids(tokenizer) + tokenizer.encode(str(p), add_special_tokens=False)
    t_ids = tokenizer.encode(" " + str(t).strip(), add_special_tokens=False)
    if not t_ids:
      raise ValueError(f"{what}[{i}]: the target {t!r} tokenises to nothing")
    _check_known(tokenizer, t_ids, f"{what}[{i}]: the target {t!r}")
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


def _check_known(tokenizer, ids: Sequence[int], what: str) -> None:
  """A target must not contain the tokenizer's unknown token: the edit would teach <unk>."""
  unk = getattr(tokenizer, "unk_token_id", None)
  if unk is not None and unk in ids and getattr(tokenizer, "unk_token", None) not in ("", None):
    raise ValueError(f"{what} has words outside the tokenizer's vocabulary (they become "
                     f"{tokenizer.unk_token!r}); use targets the tokenizer knows")


def _pad_id(tokenizer) -> int:
  """The padding id: the pad token, else eos (GPT-2 has no pad token; padded positions are masked
  by attention_mask and labels everywhere, so the value never matters), else 0."""
  for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if t is not None:
      return int(t)
  return 0


def _ids(tokenizer, text: str, max_len: int) -> list[int]:
  """text with the tokenizer's own special tokens (T5: + </s>; BART: <s> + .. + </s>; BERT:
  [CLS] + .. + [SEP]), truncated to max_len as the official code does."""
  return list(tokenizer(str(text), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"])


def encode_seq2seq(tokenizer, prompts: Sequence[str], targets: Sequence[str], max_len: int,
                   decoder_start_id: int, what: str = "examples") -> Tokenized:
  """Prompt/target pairs for an encoder-decoder (T5, BART): all arrays [N, max_len] int32.

  input_ids/attention_mask: the prompt with special tokens, truncated to max_len (official);
  decoder_input_ids = [decoder_start_id] + target, labels = target + [eos] at the same decoder
  positions (logits[:, t] predicts labels[:, t]; -100 elsewhere), decoder_attention_mask over them.
  Every target token and the eos count in the loss and in exact match; kl_mask marks the same
  positions (seq2seq locality: KL at each answer token given its prefix). A target that does not
  fit (its tokens + eos > max_len) is an error, never truncated.
  """
  if len(prompts) != len(targets):
    raise ValueError(f"{what}: {len(prompts)} prompts but {len(targets)} targets")
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError(f"{what}: the tokenizer has no eos token, which seq2seq targets end with")
  n = len(prompts)
  pad = _pad_id(tokenizer)
  ids = np.full((n, max_len), pad, np.int32)
  attn = np.zeros((n, max_len), np.int32)
  dec = np.full((n, max_len), pad, np.int32)
  dec_attn = np.zeros((n, max_len), np.int32)
  labels = np.full((n, max_len), IGNORE, np.int32)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    if not str(p).strip() or not str(t).strip():
      raise ValueError(f"{what}[{i}]: empty prompt or target (prompt {p!r}, target {t!r})")
    p_ids = _ids(tokenizer, p, max_len)
    t_ids = tokenizer.encode(str(t).strip(), add_special_tokens=False)
    if len(t_ids) + 1 > max_len:
      raise ValueError(f"{what}[{i}]: target {t!r} is {len(t_ids)} tokens + eos, longer than "
                       f"max_len={max_len}; raise data.max_len")
    ids[i, : len(p_ids)] = p_ids
    attn[i, : len(p_ids)] = 1
    m = len(t_ids) + 1
    dec[i, :m] = [int(decoder_start_id)] + t_ids
    dec_attn[i, :m] = 1
    labels[i, :m] = t_ids + [eos]
  kl = (labels != IGNORE).astype(np.int32)
  return Tokenized(ids, attn, labels, kl, dec, dec_attn)


def encode_binary(tokenizer, texts: Sequence[str], labels: Sequence[int], max_len: int,
                  what: str = "examples") -> Tokenized:
  """Texts with binary labels for a classifier (BERT): input_ids/attention_mask [N, max_len] (the
  text with special tokens, truncated to max_len as the official code does), labels [N] int32 in
  {0, 1}. The single logit is the prediction: loss = Bernoulli NLL, success = (logit > 0) == label,
  locality = closed-form Bernoulli KL; no kl_mask."""
  if len(texts) != len(labels):
    raise ValueError(f"{what}: {len(texts)} texts but {len(labels)} labels")
  n = len(texts)
  ids = np.full((n, max_len), _pad_id(tokenizer), np.int32)
  attn = np.zeros((n, max_len), np.int32)
  y = np.zeros((n,), np.int32)
  for i, (t, lab) in enumerate(zip(texts, labels)):
    if not str(t).strip():
      raise ValueError(f"{what}[{i}]: empty text")
    if isinstance(lab, bool) or lab in (0, 1):
      y[i] = int(lab)
    else:
      raise ValueError(f"{what}[{i}]: label {lab!r} is not 0 or 1")
    t_ids = _ids(tokenizer, t, max_len)
    ids[i, : len(t_ids)] = t_ids
    attn[i, : len(t_ids)] = 1
  return Tokenized(ids, attn, y)


def encode_continuations(tokenizer, texts: Sequence[str], n_tokens: Sequence[int], max_len: int,
                         drop_seed: int | None = None, what: str = "examples") -> Tokenized:
  """Texts whose last n_tokens[i] tokens are the edit target (Wikitext generation, causal LM).

  Tokens: the whole text, no bos (as the official code), left-truncated to max_len so the target
  always survives; labels = the last n_tokens real tokens (-100 on the context and padding); the
  loss and exact match read those only; kl_mask marks the positions that predict them.
  With drop_seed (the paraphrase view): a prefix of k real tokens is dropped first, k uniform in
  0..(len - n_tokens) // 2 and seeded by (drop_seed, i) (the official code draws k per batch).
  """
  if len(texts) != len(n_tokens):
    raise ValueError(f"{what}: {len(texts)} texts but {len(n_tokens)} n_tokens")
  n = len(texts)
  ids = np.full((n, max_len), _pad_id(tokenizer), np.int32)
  attn = np.zeros((n, max_len), np.int32)
  labels = np.full((n, max_len), IGNORE, np.int32)
  kl = np.zeros((n, max_len), np.int32)
  for i, (text, k) in enumerate(zip(texts, n_tokens)):
    k = int(k)
    seq = tokenizer.encode(str(text), add_special_tokens=False)
    if k < 1 or len(seq) <= k:
      raise ValueError(f"{what}[{i}]: text of {len(seq)} tokens cannot hold a context plus the "
                       f"last n_tokens={k} target tokens ({str(text)[:60]!r})")
    if k >= max_len:
      raise ValueError(f"{what}[{i}]: n_tokens={k} leaves no context within max_len={max_len}")
    if drop_seed is not None:
      drop = int(np.random.default_rng([drop_seed, i]).integers(0, (len(seq) - k) // 2 + 1))
      seq = seq[drop:]
    seq = seq[-max_len:]
    m = len(seq)
    ids[i, :m] = seq
    attn[i, :m] = 1
    labels[i, m - k: m] = seq[m - k:]
    kl[i, m - k - 1: m - 1] = 1
  return Tokenized(ids, attn, labels, kl)


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, what: str = "examples") -> Tokenized:
  """Held-out texts for the generation locality loss: tokens (no bos) truncated to max_len;
  labels = every real token (the first is never predicted, so is not scored); kl_mask =
  attention_mask, so the locality KL is taken at every non-pad token."""
  n = len(texts)
  ids = np.full((n, max_len), _pad_id(tokenizer), np.int32)
  attn = np.zeros((n, max_len), np.int32)
  labels = np.full((n, max_len), IGNORE, np.int32)
  for i, text in enumerate(texts):
    seq = tokenizer.encode(str(text), add_special_tokens=False)[:max_len]
    if len(seq) < 2:
      raise ValueError(f"{what}[{i}]: text {str(text)[:60]!r} has {len(seq)} tokens; need at least 2")
    ids[i, : len(seq)] = seq
    attn[i, : len(seq)] = 1
    labels[i, : len(seq)] = seq
  return Tokenized(ids, attn, labels, attn.copy())


@functools.lru_cache(maxsize=16)
def _block_input_fn(model: models.EditableModel):
  return jax.jit(model.block_input)


REQUIRED = ("src", "alt", "rephrase", "loc", "loc_ans")
# Record fields each data task needs (see EditData.from_records).
TASK_FIELDS = {
    "causal_lm": REQUIRED,
    "seq2seq": REQUIRED,
    "binary": REQUIRED,  # alt and loc_ans are int labels in {0, 1}
    "generation": ("src", "n_tokens", "loc"),
}


@dataclasses.dataclass(frozen=True)
class EditData:
  """The tokenised views of a list of records, index-aligned (optionally with cached frozen
  activations, `with_cached_activations`)."""

  edit: Tokenized
  equiv: Tokenized
  loc: Tokenized
  records: tuple

  def __len__(self):
    return len(self.records)

  @classmethod
  def from_records(cls, records: Sequence[Mapping], tokenizer, max_len: int, name: str = "records",
                   task: str = "causal_lm", decoder_start_id: int | None = None, seed: int = 0):
    """Tokenises records for the model's task (`EditableModel.task`, or "generation").

    causal_lm: `encode_pairs` (prompt + " " + target); seq2seq: `encode_seq2seq` (needs
    decoder_start_id, the model config's decoder_start_token_id); binary: `encode_binary` with
    alt / loc_ans as int labels; generation (a causal LM editing text continuations, Wikitext):
    edit = `encode_continuations` of src with its last n_tokens as the target, equiv = the same
    with a seeded random prefix dropped, loc = `encode_texts` of loc.
    """
    if task not in TASK_FIELDS:
      raise ValueError(f"{name}: task must be one of {sorted(TASK_FIELDS)}, got {task!r}")
    if not records:
      raise ValueError(f"{name}: no records")
    for i, r in enumerate(records):
      missing = [k for k in TASK_FIELDS[task] if k not in r or r[k] is None or r[k] == ""]
      if missing:
        raise ValueError(f"{name}[{i}]: missing or empty field(s) {missing}")
    col = lambda k: [r[k] for r in records]
    if task == "causal_lm":
      enc = lambda p, t, what: encode_pairs(tokenizer, col(p), col(t), max_len, f"{name} {what}")
    elif task == "seq2seq":
      if decoder_start_id is None:
        raise ValueError(f"{name}: seq2seq encoding needs decoder_start_id (the model config's "
                         "decoder_start_token_id: T5 0, BART 2)")
      enc = lambda p, t, what: encode_seq2seq(tokenizer, col(p), col(t), max_len, decoder_start_id,
                                              f"{name} {what}")
    elif task == "binary":
      enc = lambda p, t, what: encode_binary(tokenizer, col(p), col(t), max_len, f"{name} {what}")
    else:
      texts, n_tok = col("src"), col("n_tokens")
      return cls(
          edit=encode_continuations(tokenizer, texts, n_tok, max_len, None, f"{name} edit"),
          equiv=encode_continuations(tokenizer, texts, n_tok, max_len, seed, f"{name} paraphrase"),
          loc=encode_texts(tokenizer, col("loc"), max_len, f"{name} locality"),
          records=tuple(records),
      )
    return cls(
        edit=enc("src", "alt", "edit"),
        equiv=enc("rephrase", "alt", "paraphrase"),
        loc=enc("loc", "loc_ans", "locality"),
        records=tuple(records),
    )

  def subset(self, idx) -> "EditData":
    """The records at idx (in that order), with their tokenised views (and cached activations,
    copied into memory: see `without_cached_activations`)."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
      raise ValueError(f"subset: expected a list of row indices in [0, {len(self)}), got {idx.tolist()!r}")
    return EditData(edit=self.edit.rows(idx), equiv=self.equiv.rows(idx), loc=self.loc.rows(idx),
                    records=tuple(self.records[i] for i in idx))

  def without_cached_activations(self) -> "EditData":
    """This data without its cached activations (batches then run the whole model); the rest is shared."""
    return dataclasses.replace(self, **{v: dataclasses.replace(getattr(self, v), hidden=None)
                                        for v in ("edit", "equiv", "loc")})

  def locality_split(self, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, other rows): a seeded random `share` of the locality subjects (`loc_subject`; each
    record is its own unit when the records do not all name one) and the records whose locality
    examples ask about them, then the rest. Both are sorted and non-empty."""
    if not 0 < share < 1:
      raise ValueError(f"the share of locality subjects to set aside must be in (0, 1), got {share!r}")
    if all("loc_subject" in r for r in self.records):
      keys = [r["loc_subject"] for r in self.records]
    else:
      keys = list(range(len(self.records)))
    units = sorted(set(keys), key=str)
    n = int(round(share * len(units)))
    if not 0 < n < len(units):
      raise ValueError(f"a share of {share} of {len(units)} locality subjects leaves one side empty")
    # A stream of its own: `sample` draws step s from [seed, s], and no run reaches 2^40 steps.
    chosen = {units[i] for i in np.random.default_rng([seed, 1 << 40]).permutation(len(units))[:n]}
    mask = np.asarray([k in chosen for k in keys])
    return np.flatnonzero(mask), np.flatnonzero(~mask)

  def batch(self, idx, loc_idx=None, loc_pool=None) -> dict[str, dict[str, np.ndarray]]:
    """{"edit", "equiv", "loc"} batches for the records at idx (locality rows loc_idx, default idx;
    a locality row about a fact that one of the edits changes is replaced, `unedited_locality`,
    by one of loc_pool's rows if given)."""
    loc_idx = self.unedited_locality(idx, idx if loc_idx is None else loc_idx, loc_pool)
    return {"edit": self.edit.take(idx), "equiv": self.equiv.take(idx), "loc": self.loc.take(loc_idx)}

  @functools.cached_property
  def _facts(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(the fact each row edits, the fact its locality example asks about) as integer ids, or None
    when the records do not name them (subject, relation, loc_subject, loc_relation)."""
    keys = ("subject", "relation", "loc_subject", "loc_relation")
    if not all(k in r for r in self.records for k in keys):
      return None
    ids: dict = {}
    edit = np.asarray([ids.setdefault((r["subject"], r["relation"]), len(ids)) for r in self.records])
    loc = np.asarray([ids.setdefault((r["loc_subject"], r["loc_relation"]), len(ids)) for r in self.records])
    return edit, loc

  def unedited_locality(self, edit_idx, loc_idx, pool=None) -> np.ndarray:
    """loc_idx with every row whose locality example asks about a fact edited by a record at edit_idx
    replaced by the next row (cyclically; of `pool`, sorted row indices, if given) whose example
    does not. Such an example is not a locality test: the edits are meant to change its answer
    (with k edits out of n facts, about k/n of the locality rows would be). Unchanged when the
    records do not name their facts, or when every row's example is about an edited fact (logged)."""
    loc_idx = np.asarray(loc_idx)
    if self._facts is None:
      return loc_idx
    edit_fact, loc_fact = self._facts
    good = np.flatnonzero(~np.isin(loc_fact, edit_fact[np.asarray(edit_idx)]))
    if pool is not None:
      good = np.intersect1d(good, pool)
    if len(good) == 0:  # e.g. a whole small split edited at once: nothing better to measure with
      logging.warning("every locality example of these %d records%s asks about one of the %d edited facts; "
                      "locality is measured on them as they are", len(self) if pool is None else len(pool),
                      "" if pool is None else " (of the locality pool)", len(np.asarray(edit_idx)))
      return loc_idx
    bad = ~np.isin(loc_idx, good)
    out = loc_idx.copy()
    out[bad] = good[np.searchsorted(good, loc_idx[bad]) % len(good)]
    return out

  def with_cached_activations(self, model: models.EditableModel, params, batch_size: int = 64,
                              dtype: str = "float32", directory: str | None = None,
                              name: str = "data") -> "EditData":
    """This data with every row's hidden state entering the model's lowest edited block
    (`EditableModel.block_input` under `params`) computed once and carried in its batches as
    "hidden", so training and evaluation run only the edited blocks and the head. Valid for every
    editor that changes only the editable layers (not ENN, which trains the whole model).

    Args:
      batch_size: rows per forward pass while computing.
      dtype: "float32" or "bfloat16" (half the memory; the forward then starts from rounded values).
      directory: keep the arrays in memory-mapped .npy files there (written to a temporary name,
        then renamed; an existing file of the same name and shape is reused) instead of in memory.
      name: the files' prefix in `directory`.
    """
    if dtype not in models.DTYPES:
      raise ValueError(f"cached activation dtype must be one of {sorted(models.DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(models.DTYPES[dtype])
    fn = _block_input_fn(model)
    views = {}
    for view in ("edit", "equiv", "loc"):
      tok: Tokenized = getattr(self, view)
      plain = dataclasses.replace(tok, hidden=None)
      n = len(tok)
      first = np.asarray(fn(params, plain.take(np.arange(min(batch_size, n)))))
      shape = (n,) + first.shape[1:]
      path = None if directory is None else os.path.join(directory, f"{name}_{view}_{dtype}.npy")
      if path is not None and os.path.isfile(path):
        old = np.load(path, mmap_mode="r")
        if old.shape == shape and old.dtype == np_dtype:
          views[view] = dataclasses.replace(plain, hidden=old)
          continue
      if path is None:
        out = np.empty(shape, np_dtype)
      else:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
      for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        if len(idx) < batch_size:  # one compiled shape: pad the last chunk
          idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        h = np.asarray(fn(params, plain.take(idx)))
        stop = min(start + batch_size, n)
        out[start:stop] = h[: stop - start].astype(np_dtype)
      if path is not None:
        out.flush()
        del out
        os.replace(tmp, path)
        out = np.load(path, mmap_mode="r")
      views[view] = dataclasses.replace(plain, hidden=out)
    return dataclasses.replace(self, **views)

  @functools.cached_property
  def _groups(self) -> list[np.ndarray] | None:
    """Row indices per distinct record "group" (in first-seen order), or None when no record has one."""
    if not any("group" in r for r in self.records):
      return None
    members: dict = {}
    for i, r in enumerate(self.records):
      members.setdefault(r.get("group", ("row", i)), []).append(i)
    return [np.asarray(m) for m in members.values()]

  def sample(self, seed: int, step: int, n_edits: int, n_loc: int, loc_pool=None):
    """The training batch of `step`: a pure function of (seed, step). When records carry a
    "group" (several edits of one fact), the edits come from distinct groups, one row each.
    loc_pool: the rows whose locality examples may be drawn (sorted; default all)."""
    rng = np.random.default_rng([seed, step])
    groups = self._groups
    if groups is None:
      idx = rng.choice(len(self), size=n_edits, replace=len(self) < n_edits)
    else:
      picked = rng.choice(len(groups), size=n_edits, replace=len(groups) < n_edits)
      idx = np.asarray([groups[g][rng.integers(len(groups[g]))] for g in picked])
    if loc_pool is None:
      loc_idx = rng.choice(len(self), size=n_loc, replace=len(self) < n_loc)
    else:
      loc_idx = rng.choice(loc_pool, size=n_loc, replace=len(loc_pool) < n_loc)
    return self.batch(idx, loc_idx, loc_pool)
