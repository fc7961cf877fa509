"""Evaluation of an editor on held-out edits: batched and sequential edits, and greedy answers.

Metrics (teacher-forced exact match of every target token, as the paper; binary tasks: the sign
of the logit agrees with the label):
  edit_success:       the edited model gives the new target on the paraphrase x'_e;
  reliability:        ... on the edit prompt x_e itself;
  locality_acc_pre:   the unedited model gives the locality example's answer;
  locality_acc_post:  the edited model still does;
  locality_drawdown:  pre - post;
  locality_unchanged: the share of the locality answers' predicted tokens (teacher forced) that
                      the edit leaves unchanged, averaged over locality examples (EasyEdit's locality);
  locality_to_target: (sequence tasks) the share of those tokens that the edit changes to a token
                      of the new targets of the edits applied with it: their answers leaking into
                      unrelated prompts (part of 1 - locality_unchanged);
  locality_to_other_targets: (batched, sequence tasks) the same count against the new targets of the
                      k test records that follow the batch, edits not applied: how often a change
                      lands on such a token by chance (relations with few possible answers share
                      most of them between batches), the baseline for locality_to_target;
  locality_protected: with `protected` (an EditData of facts to keep, e.g. the split a preservation
                      term was measured on: `checkpoint.LoadedEditor.protecting`), the share of
                      its locality answers' predicted tokens each batch leaves unchanged, over
                      min(k, len(protected)) of its examples per batch, taken in order and cycling;
  ppl_pre, ppl_post:  (sequence tasks) perplexity of the locality labels before / after the edit,
                      exp of the token-mean NLL over all locality examples; ppl_drawdown = post - pre
                      (the paper's drawdown for generation);
  text_ppl_pre, text_ppl_post, text_ppl_drawdown: with `text` (a batch of plain passages), their
                      perplexity before and after each edit (after the last, for sequential editing);
  time_per_edit_s:    median wall time of the jitted edit (after compilation) / edits per batch;
  peak_rss_gb:        the process's peak resident memory so far.

Batched editing (`evaluate`): k test edits applied at once to the unedited model, for each
consecutive group of k test records. Sequential editing (`evaluate_sequential`): k edits applied
one after another to the same model (each from the model the previous one left); after edit j
the success of edits 1..j is measured again (`retained_*` curves), and locality after all k.
Lifelong editing (`evaluate_stream`): one long stream of edits, k at a time, with the retained
success of all earlier edits and the locality measured along it.
Locality examples are never about a fact the same batch (sequence, stream) edits, when the
records name their facts (`EditData.unedited_locality`): k edits of the k facts a locality set
asks about would be counted as locality failures.

Every editor works here (`mend_jax.editors.base.Editor`); its `pre_edit_params(state,
base_params)` gives the model its edits start from (ENN trains its own copy of the model).
Tables and plots of the results are in `mend_jax.report`.
"""

from __future__ import annotations

import functools
import resource
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mend_jax import editors, losses
from mend_jax.data.batches import EditData
from mend_jax.editors.base import Editor, EditorState


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _scores(task, logits_fn, params, batch) -> dict:
  """Per-example success [B] on equiv/edit/loc, the locality logits, and the NLL sums of the
  locality labels (and of the plain text, if the batch has "text") for perplexity."""
  out = {
      "edit_success": losses.exact_match(task, logits_fn(params, batch["equiv"]), batch["equiv"]),
      "reliability": losses.exact_match(task, logits_fn(params, batch["edit"]), batch["edit"]),
  }
  out["loc_logits"] = loc_logits = logits_fn(params, batch["loc"])
  out["locality_acc"] = losses.exact_match(task, loc_logits, batch["loc"])
  if task != "binary":
    logp, mask = losses.token_logprobs(task, loc_logits, batch["loc"])
    out["loc_nll_sum"], out["loc_tokens"] = -jnp.sum(logp * mask), jnp.sum(mask)
  if "text" in batch:
    logp, mask = losses.token_logprobs(task, logits_fn(params, batch["text"]), batch["text"])
    out["text_nll_sum"], out["text_tokens"] = -jnp.sum(logp * mask), jnp.sum(mask)
  return out


def _compare(task, batch, before: dict, after: dict) -> dict:
  """The per-batch outputs shared by batched and sequential evaluation (the plain text's NLL
  before the edits does not depend on them: `_text_nll` computes it once)."""
  out = {"locality_acc_pre": before["locality_acc"], "locality_acc_post": after["locality_acc"],
         "locality_unchanged": losses.prediction_agreement(task, before["loc_logits"], after["loc_logits"],
                                                           batch["loc"])}
  if task != "binary":
    out["locality_to_target"] = losses.changed_to_targets(task, before["loc_logits"], after["loc_logits"],
                                                          batch["loc"], batch["edit"]["labels"])
    if "other_targets" in batch:
      out["locality_to_other_targets"] = losses.changed_to_targets(task, before["loc_logits"], after["loc_logits"],
                                                                   batch["loc"], batch["other_targets"])
  if "loc_nll_sum" in after:
    out.update(loc_nll_pre=before["loc_nll_sum"], loc_nll_post=after["loc_nll_sum"], loc_tokens=after["loc_tokens"])
  if "text_nll_sum" in after:
    out.update(text_nll_post=after["text_nll_sum"], text_tokens=after["text_tokens"])
  return out


@functools.lru_cache(maxsize=16)
def _text_nll(editor: Editor):
  """Jitted (state, base_params, text) -> NLL sum of the text under the unedited model."""
  def fn(state, base_params, text):
    pre = editor.pre_edit_params(state, base_params)
    logp, mask = losses.token_logprobs(editor.model.task, editor.model.logits(pre, text), text)
    return -jnp.sum(logp * mask)

  return jax.jit(fn)


def _without_text(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "text"}


@functools.lru_cache(maxsize=16)
def make_eval_fn(editor: Editor):
  """Jitted (state, base_params, batch) -> per-example arrays for one batch of k edits."""
  task = editor.model.task

  def fn(state, base_params, batch):
    pre = editor.pre_edit_params(state, base_params)
    new_params, _ = editor.edit(state, pre, batch["edit"], check=False)
    before = _scores(task, editor.model.logits, pre, _without_text(batch))
    after = _scores(task, editor.model.logits, new_params, batch)
    out = {"edit_success": after["edit_success"], "reliability": after["reliability"],
           **_compare(task, batch, before, after)}
    if "protected" in batch:
      rows = batch["protected"]
      out["locality_protected"] = losses.prediction_agreement(
          task, editor.model.logits(pre, rows), editor.model.logits(new_params, rows), rows)
    return out

  return jax.jit(fn)


def _finish(out: dict, times: list, k: int, n: int) -> dict:
  res = {key: float(np.mean(np.concatenate([np.atleast_1d(x) for x in v])))
         for key, v in out.items() if not key.startswith(("loc_", "text_"))}
  res["locality_drawdown"] = res["locality_acc_pre"] - res["locality_acc_post"]
  for key, name in (("loc", "ppl"), ("text", "text_ppl")):
    if f"{key}_tokens" in out:
      toks = max(float(np.sum(out[f"{key}_tokens"])), 1.0)
      res[f"{name}_pre"] = float(np.exp(np.sum(out[f"{key}_nll_pre"]) / toks))
      res[f"{name}_post"] = float(np.exp(np.sum(out[f"{key}_nll_post"]) / toks))
      res[f"{name}_drawdown"] = res[f"{name}_post"] - res[f"{name}_pre"]
  res["time_per_edit_s"] = float(np.median(times[1:] if len(times) > 1 else times)) / k
  res["n_test_edits"] = n
  res["edits_per_batch"] = k
  res["peak_rss_gb"] = _peak_rss_gb()
  return res


def _n_edits(data: EditData, n_edits: int | None, k: int) -> int:
  if k < 1:
    raise ValueError(f"k (edits per batch or per sequence) must be >= 1, got {k}")
  n = len(data) if n_edits is None else min(n_edits, len(data))
  n = (n // k) * k
  if n == 0:
    raise ValueError(f"k={k} edits need at least {k} test records, have {min(len(data), n_edits or len(data))}")
  return n


def _other_targets(data: EditData, idx: np.ndarray) -> np.ndarray:
  """The new targets' labels of the len(idx) records after idx (cyclically), for
  locality_to_other_targets; rows that are records of idx itself (a split shorter than 2k) are
  ignored."""
  other = (idx[-1] + 1 + np.arange(len(idx))) % len(data)
  labels = np.array(data.edit.take(other)["labels"])
  labels[np.isin(other, idx)] = losses.IGNORE
  return labels


def evaluate(editor: Editor, state: EditorState, base_params, data: EditData, n_edits: int | None = None,
             k: int = 1, text: dict | None = None, protected: EditData | None = None) -> dict[str, Any]:
  """Batched editing: k test edits at a time, each batch applied to the unedited model.

  Args:
    text: an optional batch of plain passages (e.g. `data.batches.encode_texts(...).take(...)`)
      whose perplexity is measured before and after each edit.
    protected: optional facts to keep (locality_protected); batch b (edits b*k .. b*k + k - 1)
      reads their locality examples b*k .. b*k + m - 1 (mod their number), m = min(k, their number).
  Returns the metrics of the module docstring averaged over the first n_edits records (all by
  default; rounded down to a multiple of k), with n_test_edits, edits_per_batch and peak_rss_gb.
  """
  n = _n_edits(data, n_edits, k)
  if protected is not None and len(protected) == 0:
    raise ValueError("protected: expected at least one record of facts to keep, got none")
  eval_fn, edit_fn = make_eval_fn(editor), editors.jit_edit(editor, from_base=True)
  out: dict[str, list] = {}
  times = []
  text_pre = None if text is None else np.asarray(_text_nll(editor)(state, base_params, text))
  for start in range(0, n, k):
    batch = data.batch(np.arange(start, start + k))
    if editor.model.task != "binary":
      batch["other_targets"] = _other_targets(data, np.arange(start, start + k))
    if text is not None:
      batch["text"] = text
      out.setdefault("text_nll_pre", []).append(text_pre)
    if protected is not None:
      batch["protected"] = protected.loc.take((start + np.arange(min(k, len(protected)))) % len(protected))
    for key, v in eval_fn(state, base_params, batch).items():
      out.setdefault(key, []).append(np.asarray(v))
    t0 = time.perf_counter()
    jax.block_until_ready(edit_fn(state, base_params, batch["edit"], check=False))  # data checked at encoding
    times.append(time.perf_counter() - t0)
  return _finish(out, times, k, n)


@functools.lru_cache(maxsize=16)
def make_sequential_fn(editor: Editor):
  """Jitted (state, base_params, batch of k records) -> curves: edits applied one by one (a scan);
  after edit j, success on every record's paraphrase and edit input ([k, k]: step x record)."""
  task = editor.model.task

  def fn(state, base_params, batch):
    pre = editor.pre_edit_params(state, base_params)
    rows = jax.tree_util.tree_map(lambda x: x[:, None], batch["edit"])  # [k, 1, ...]: one edit per step

    def step(params, row):
      new, _ = editor.edit(state, params, row, check=False)
      success = lambda view: losses.exact_match(task, editor.model.logits(new, batch[view]), batch[view])
      return new, (success("equiv"), success("edit"))

    final, (es, rel) = jax.lax.scan(step, pre, rows)
    before = _scores(task, editor.model.logits, pre, _without_text(batch))
    after = _scores(task, editor.model.logits, final, batch)
    return {"es_curve": es, "rel_curve": rel, **_compare(task, batch, before, after)}

  return jax.jit(fn)


def evaluate_sequential(editor: Editor, state: EditorState, base_params, data: EditData, k: int,
                        n_edits: int | None = None, text: dict | None = None) -> dict[str, Any]:
  """Sequential editing: consecutive groups of k test records, each group's edits applied one
  after another to one model. Returns, averaged over the groups:
    edit_success / reliability: success of all k edits after the last one (retained);
    retained_edit_success / retained_reliability: [k] curves, entry j = mean success of edits
      1..j+1 right after edit j+1;
    locality_* and ppl_*: after all k edits, against the unedited model."""
  n = _n_edits(data, n_edits, k)
  fn, edit_fn = make_sequential_fn(editor), editors.jit_edit(editor, from_base=True)
  es_curves, rel_curves, out, times = [], [], {}, []
  tri = np.tril(np.ones((k, k)))  # [step j, record i]: i <= j
  text_pre = None if text is None else np.asarray(_text_nll(editor)(state, base_params, text))
  for start in range(0, n, k):
    batch = data.batch(np.arange(start, start + k))
    if text is not None:
      batch["text"] = text
      out.setdefault("text_nll_pre", []).append(text_pre)
    t0 = time.perf_counter()
    r = jax.device_get(fn(state, base_params, batch))
    times.append((time.perf_counter() - t0))
    es_curves.append((r["es_curve"] * tri).sum(1) / tri.sum(1))
    rel_curves.append((r["rel_curve"] * tri).sum(1) / tri.sum(1))
    for key, v in r.items():
      if not key.endswith("_curve"):
        out.setdefault(key, []).append(np.asarray(v))
  # Time per edit: single-edit jitted edits, as in batched evaluation with k = 1.
  one = data.batch(np.arange(0, 1))["edit"]
  edit_times = []
  for _ in range(4):
    t0 = time.perf_counter()
    jax.block_until_ready(edit_fn(state, base_params, one, check=False))
    edit_times.append(time.perf_counter() - t0)
  res = _finish(out, edit_times, 1, n)
  es, rel = np.mean(es_curves, 0), np.mean(rel_curves, 0)
  res.update(edit_success=float(es[-1]), reliability=float(rel[-1]),
             retained_edit_success=[float(x) for x in es], retained_reliability=[float(x) for x in rel],
             edits_per_sequence=k, edits_per_batch=1, sequence_time_s=float(np.median(times)))
  return res


@functools.lru_cache(maxsize=16)
def _stream_fns(editor: Editor):
  """Jitted (params, batch) -> per-record success on paraphrase and edit prompt; and (base
  params, params, loc batch) -> (locality exact match before, after, predictions unchanged)."""
  task = editor.model.task

  def success(params, batch):
    return (losses.exact_match(task, editor.model.logits(params, batch["equiv"]), batch["equiv"]),
            losses.exact_match(task, editor.model.logits(params, batch["edit"]), batch["edit"]))

  def locality(base, params, loc):
    before, after = editor.model.logits(base, loc), editor.model.logits(params, loc)
    return (losses.exact_match(task, before, loc), losses.exact_match(task, after, loc),
            losses.prediction_agreement(task, before, after, loc))

  return jax.jit(success), jax.jit(locality)


def evaluate_stream(editor: Editor, state: EditorState, base_params, data: EditData, k: int = 1,
                    n_edits: int | None = None, every: int = 10, n_loc: int = 100, chunk: int = 32) -> dict:
  """Lifelong editing: the first n_edits records as one stream, k edits at a time, every batch
  applied to the model the previous one left. After every `every` batches (and the last) the
  retained success of every edit so far (paraphrase and edit prompt) and the locality on a fixed
  set (up to n_loc locality examples about facts the stream does not edit, against the unedited
  model) are measured.

  Returns {"k", "n_edits", "curve": [{"edits", "edit_success", "reliability", "locality_unchanged",
  "locality_drawdown"}, ...], "time_per_edit_s"}: the curve's last row is after the whole stream.
  """
  n = _n_edits(data, n_edits, k)
  if every < 1:
    raise ValueError(f"every (batches between measurements) must be >= 1, got {every}")
  success_fn, locality_fn = _stream_fns(editor)
  edit_fn = editors.jit_edit(editor)
  pre = editor.pre_edit_params(state, base_params)
  # Locality examples about facts the stream never edits (`EditData.unedited_locality`).
  loc_rows = np.unique(data.unedited_locality(np.arange(n), np.arange(len(data))))
  loc = data.loc.take(loc_rows[:n_loc])
  params, curve, times = pre, [], []
  n_batches = n // k
  for b in range(n_batches):
    batch = data.edit.take(np.arange(b * k, (b + 1) * k))
    t0 = time.perf_counter()
    params, _ = edit_fn(state, params, batch, check=False)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
    if (b + 1) % every and b + 1 < n_batches:
      continue
    done = (b + 1) * k
    es, rel = [], []
    for start in range(0, done, chunk):  # fixed chunk shapes: the last chunk repeats records
      idx = np.minimum(np.arange(start, start + chunk), done - 1)
      e, r = jax.device_get(success_fn(params, data.batch(idx)))
      keep = np.arange(start, start + chunk) < done
      es.append(np.asarray(e)[keep])
      rel.append(np.asarray(r)[keep])
    acc_pre, acc_post, unchanged = (np.asarray(x) for x in jax.device_get(locality_fn(pre, params, loc)))
    curve.append({"edits": done, "edit_success": float(np.mean(np.concatenate(es))),
                  "reliability": float(np.mean(np.concatenate(rel))),
                  "locality_unchanged": float(np.mean(unchanged)),
                  "locality_drawdown": float(np.mean(acc_pre) - np.mean(acc_post))})
    logging.info("stream: %d edits: %s", done, summary(curve[-1]))
  return {"k": k, "n_edits": n, "curve": curve,
          "time_per_edit_s": float(np.median(times[1:] if len(times) > 1 else times)) / k,
          "peak_rss_gb": _peak_rss_gb()}


def evaluate_ks(editor: Editor, state: EditorState, base_params, data: EditData,
                ks: Sequence[int] = (1, 5, 25, 125), n_edits: int | None = None, sequential: bool = True,
                text: dict | None = None) -> dict:
  """{"batched": {k: results}, "sequential": {k: results}} for each k that the data allows (a k
  above the number of test edits is skipped, with a warning)."""
  out: dict[str, dict] = {"batched": {}, "sequential": {}}
  avail = len(data) if n_edits is None else min(n_edits, len(data))
  for k in ks:
    if k > avail:
      logging.warning("k=%d: skipped, only %d test edits", k, avail)
      continue
    out["batched"][k] = evaluate(editor, state, base_params, data, n_edits, k, text)
    logging.info("batched k=%d: %s", k, summary(out["batched"][k]))
    if sequential:
      out["sequential"][k] = evaluate_sequential(editor, state, base_params, data, k, n_edits, text)
      logging.info("sequential k=%d: %s", k, summary(out["sequential"][k]))
  return out


def summary(r: dict) -> str:
  """One line of the main metrics of a result dict."""
  keys = ("edit_success", "reliability", "locality_unchanged", "locality_drawdown", "ppl_drawdown",
          "text_ppl_drawdown", "time_per_edit_s")
  return ", ".join(f"{key}={r[key]:.4f}" for key in keys if key in r)
