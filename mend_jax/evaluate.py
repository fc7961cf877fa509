"""Evaluation of an editor on held-out edits, and greedy answers for showing an edit.

Metrics (teacher-forced exact match of every target token, as the paper):
  edit_success:      the edited model gives the new target on the paraphrase x'_e;
  reliability:       ... on the edit prompt x_e itself;
  locality_acc_pre:  the base model gives the true answer on unrelated prompts;
  locality_acc_post: the edited model still does;
  locality_drawdown: pre - post;
  time_per_edit_s:   median wall time of the jitted edit (after compilation) divided by edits/batch.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mend_jax import losses
from mend_jax.data import EditData
from mend_jax.mend import MEND, EditorState


def make_eval_fn(editor: MEND):
  """Jitted (state, base_params, batch) -> per-example success arrays for one batch of k edits."""
  task = editor.model.task

  def fn(state: EditorState, base_params, batch):
    new_params, _ = editor.edit(state, base_params, batch["edit"])
    logits = lambda p, b: editor.model.logits(p, b)
    return {
        "edit_success": losses.exact_match(task, logits(new_params, batch["equiv"]), batch["equiv"]),
        "reliability": losses.exact_match(task, logits(new_params, batch["edit"]), batch["edit"]),
        "locality_acc_pre": losses.exact_match(task, logits(base_params, batch["loc"]), batch["loc"]),
        "locality_acc_post": losses.exact_match(task, logits(new_params, batch["loc"]), batch["loc"]),
    }

  return jax.jit(fn)


def evaluate(editor: MEND, state: EditorState, base_params, data: EditData, n_edits: int | None = None,
             k: int = 1) -> dict[str, Any]:
  """Edits the base model with k test edits at a time (each batch from the base model) and averages
  the metrics over the first n_edits records (all by default; rounded down to a multiple of k)."""
  n = len(data) if n_edits is None else min(n_edits, len(data))
  n = (n // k) * k
  if n == 0:
    raise ValueError(f"need at least k={k} test records, have {len(data)}")
  eval_fn = make_eval_fn(editor)
  out: dict[str, list] = {}
  times = []
  for start in range(0, n, k):
    batch = data.batch(np.arange(start, start + k))
    m = eval_fn(state, base_params, batch)
    for key, v in m.items():
      out.setdefault(key, []).append(np.asarray(v))
    t0 = time.perf_counter()
    jax.block_until_ready(editor.jit_edit(state, base_params, batch["edit"]))
    times.append(time.perf_counter() - t0)
  res = {key: float(np.mean(np.concatenate(v))) for key, v in out.items()}
  res["locality_drawdown"] = res["locality_acc_pre"] - res["locality_acc_post"]
  res["time_per_edit_s"] = float(np.median(times[1:] if len(times) > 1 else times)) / k
  res["n_test_edits"] = n
  res["edits_per_batch"] = k
  return res


def greedy_answer(model, params, tokenizer, prompt: str, max_new_tokens: int = 3, max_len: int | None = None) -> str:
  """Greedy continuation of `prompt` (causal LMs), stopping at eos/pad. Fixed-length input, so the
  forward pass compiles once per max_len."""
  max_len = max_len or model.max_length or 64
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds "
                     f"the context of {max_len}")
  stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
  fwd = _forward(model, max_len)
  new = []
  for _ in range(max_new_tokens):
    arr = np.zeros((1, max_len), np.int32)
    arr[0, : len(ids)] = ids
    mask = (np.arange(max_len) < len(ids)).astype(np.int32)[None]
    nxt = int(fwd(params, jnp.asarray(arr), jnp.asarray(mask), len(ids) - 1))
    if nxt in stop:
      break
    ids.append(nxt)
    new.append(nxt)
  return tokenizer.decode(new).strip()


_FWD_CACHE: dict = {}


def _forward(model, max_len):
  key = (id(model), max_len)
  if key not in _FWD_CACHE:
    _FWD_CACHE[key] = jax.jit(lambda p, ids, mask, pos: jnp.argmax(
        model.logits(p, {"input_ids": ids, "attention_mask": mask})[0, pos]))
  return _FWD_CACHE[key]
