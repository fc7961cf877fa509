"""Batched and sequential evaluation against brute-force loops over single edits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax import evaluate as eval_lib
from mend_jax import losses, report
from mend_jax.data.batches import EditData
from mend_jax.editors import MEND, MENDConfig

from conftest import jit_logits


@pytest.fixture(scope="module")
def strong(synth_setup):
  """An identity editor without normalisation and a large step: a plain SGD step big enough that
  some edits succeed and some locality answers change (so the checks are not vacuous)."""
  m = synth_setup["model"]
  ed = MEND(m, MENDConfig(rank=4, norm=False, edit_lr=EDIT_LR))
  return ed, ed.init(jax.random.PRNGKey(0))


EDIT_LR = 30.0


def _success(m, params, view, idx):
  b = {k: jnp.asarray(v) for k, v in view.take(np.asarray(idx)).items()}
  return np.asarray(losses.exact_match(m.task, jit_logits(m)(params, b), b))


def test_sequential_matches_a_loop_of_single_edits(synth_setup, strong):
  m, d = synth_setup["model"], synth_setup["data"]
  ed, state = strong
  k = 3  # the k of the other tests here: the compiled programs are shared
  res = eval_lib.evaluate_sequential(ed, state, m.params, d, k=k, n_edits=2 * k)
  es_curves, rel_curves, loc_pre, loc_post = [], [], [], []
  for start in (0, k):
    idx = np.arange(start, start + k)
    params = m.params
    es_c, rel_c = [], []
    for j in range(k):
      params, _ = ed.jit_edit(state, params, d.edit.take(idx[j:j + 1]))
      es_c.append(_success(m, params, d.equiv, idx[: j + 1]).mean())
      rel_c.append(_success(m, params, d.edit, idx[: j + 1]).mean())
    es_curves.append(es_c)
    rel_curves.append(rel_c)
    loc_pre.append(_success(m, m.params, d.loc, idx))
    loc_post.append(_success(m, params, d.loc, idx))
  np.testing.assert_allclose(res["retained_edit_success"], np.mean(es_curves, 0), atol=1e-6)
  np.testing.assert_allclose(res["retained_reliability"], np.mean(rel_curves, 0), atol=1e-6)
  assert res["reliability"] == pytest.approx(np.mean(rel_curves, 0)[-1])
  assert 0 < np.max(rel_curves), "no edit succeeded: the comparison is vacuous"
  assert res["locality_acc_pre"] == pytest.approx(np.mean(loc_pre))
  assert res["locality_acc_post"] == pytest.approx(np.mean(loc_post))
  assert res["n_test_edits"] == 2 * k and res["edits_per_sequence"] == k


def _nll64(m, params, view, rows) -> tuple[float, int]:
  """Float64 loop over the label tokens of `rows` of a view, full logits: (NLL sum, tokens)."""
  total, n = 0.0, 0
  for i in rows:
    row = {key: v for key, v in view.take([i]).items() if not key.startswith("read_")}
    logits = np.asarray(jit_logits(m)(params, {key: jnp.asarray(v) for key, v in row.items()}), np.float64)[0]
    for t in np.nonzero(row["labels"][0] != -100)[0]:
      z = logits[t - 1]
      total -= z[row["labels"][0][t]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
      n += 1
  return total, n


def _unchanged(m, before, after, view, rows) -> list[float]:
  """Per locality row: the share of its label positions whose argmax is the same before/after."""
  out = []
  for i in rows:
    row = {key: jnp.asarray(v) for key, v in view.take([i]).items() if not key.startswith("read_")}
    a, b = (np.asarray(jit_logits(m)(p, row))[0].argmax(-1) for p in (before, after))
    pos = np.nonzero(np.asarray(row["labels"][0]) != -100)[0] - 1
    out.append(float(np.mean(a[pos] == b[pos])))
  return out


def _to_target(m, before, after, view, rows, targets) -> list[float]:
  """Per locality row: the share of its label positions whose argmax changes to a token of targets."""
  out = []
  for i in rows:
    row = {key: jnp.asarray(v) for key, v in view.take([i]).items() if not key.startswith("read_")}
    a, b = (np.asarray(jit_logits(m)(p, row))[0].argmax(-1) for p in (before, after))
    pos = np.nonzero(np.asarray(row["labels"][0]) != -100)[0] - 1
    out.append(float(np.mean([a[t] != b[t] and b[t] in targets for t in pos])))
  return out


def test_batched_k_matches_one_joint_edit_per_group(synth_setup, strong):
  m, d = synth_setup["model"], synth_setup["data"]
  ed, state = strong
  k, n = 3, 6
  text_rows = np.arange(10, 14)
  # Facts to keep: 4 records after the edited ones; batch b reads their locality rows 3b, 3b+1, 3b+2 mod 4.
  keep = EditData.from_records(list(d.records[20:24]), synth_setup["tok"], 24)
  res = eval_lib.evaluate(ed, state, m.params, d, n_edits=n, k=k, text=d.loc.take(text_rows), protected=keep)
  es, rel, unchanged, to_target, to_other, protected = [], [], [], [], [], []
  nll_pre, toks = _nll64(m, m.params, d.loc, range(n))
  text_pre, text_toks = _nll64(m, m.params, d.loc, text_rows)
  nll_post = text_post = 0.0
  for start in range(0, n, k):
    idx = np.arange(start, start + k)
    params, _ = ed.jit_edit(state, m.params, d.edit.take(idx))
    es.append(_success(m, params, d.equiv, idx))
    rel.append(_success(m, params, d.edit, idx))
    unchanged += _unchanged(m, m.params, params, d.loc, idx)
    labels = d.edit.take(idx)["labels"]
    to_target += _to_target(m, m.params, params, d.loc, idx, set(labels[labels != -100].tolist()))
    other = d.edit.take(np.arange(start + k, start + 2 * k))["labels"]  # the next k records' targets, not applied
    to_other += _to_target(m, m.params, params, d.loc, idx, set(other[other != -100].tolist()))
    protected += _unchanged(m, m.params, params, keep.loc, [(start + j) % 4 for j in range(k)])
    nll_post += _nll64(m, params, d.loc, idx)[0]
    text_post += _nll64(m, params, d.loc, text_rows)[0]
  assert res["edit_success"] == pytest.approx(np.mean(es))
  assert res["reliability"] == pytest.approx(np.mean(rel))
  assert res["locality_unchanged"] == pytest.approx(np.mean(unchanged))
  assert res["locality_unchanged"] < 0.5  # this editor's large step changes most predictions
  assert res["locality_to_target"] == pytest.approx(np.mean(to_target))
  assert res["locality_to_other_targets"] == pytest.approx(np.mean(to_other))
  assert res["locality_protected"] == pytest.approx(np.mean(protected)) and res["locality_protected"] < 1.0
  with pytest.raises(ValueError, match="protected: expected at least one record"):
    eval_lib.evaluate(ed, state, m.params, d, n_edits=n, k=k, protected=keep.subset([]))
  # Records followed by copies of themselves: the targets not applied are the batch's own, so the
  # two counts agree; a split of just the batch has no other records to count against.
  recs = list(d.records[:k])
  twice = eval_lib.evaluate(ed, state, m.params, EditData.from_records(recs * 2, synth_setup["tok"], 24), n_edits=k, k=k)
  assert twice["locality_to_target"] > 0
  assert twice["locality_to_other_targets"] == pytest.approx(twice["locality_to_target"])
  once = eval_lib.evaluate(ed, state, m.params, EditData.from_records(recs, synth_setup["tok"], 24), k=k)
  assert once["locality_to_target"] == pytest.approx(twice["locality_to_target"])
  assert once["locality_to_other_targets"] == 0.0
  # A tiny step changes few or none: the metric is not a constant.
  small = state._replace(params={**state.params, "alpha": state.params["alpha"] * 1e-6})
  res_small = eval_lib.evaluate(ed, small, m.params, d, n_edits=n, k=k)
  params, _ = ed.jit_edit(small, m.params, d.edit.take(np.arange(0, k)))
  assert res_small["locality_unchanged"] > 0.9
  assert _unchanged(m, m.params, params, d.loc, range(k)) == pytest.approx([1.0] * k, abs=0.34)
  assert res["ppl_pre"] == pytest.approx(np.exp(nll_pre / toks), rel=1e-4)
  assert res["ppl_post"] == pytest.approx(np.exp(nll_post / toks), rel=1e-4)
  assert res["ppl_post"] != pytest.approx(res["ppl_pre"], rel=1e-3)
  # Plain text: its perplexity before, and after each group's edit (pooled over the groups).
  assert res["text_ppl_pre"] == pytest.approx(np.exp(text_pre / text_toks), rel=1e-4)
  assert res["text_ppl_post"] == pytest.approx(np.exp(text_post / (text_toks * (n // k))), rel=1e-4)


def test_k_sweep_table_and_plot(synth_setup, strong, tmp_path):
  m, d = synth_setup["model"], synth_setup["data"]
  ed, state = strong
  res = eval_lib.evaluate_ks(ed, state, m.params, d, ks=(3, 10 ** 6), n_edits=6)
  assert sorted(res["batched"]) == sorted(res["sequential"]) == [3]  # k > available edits is skipped
  table = report.ks_table(res)
  assert table.count("\n") == 1 + 2 and "| sequential | 3 | 6 |" in table and "| batched | 3 | 6 |" in table
  report.plot_ks(res, str(tmp_path / "k.png"))
  assert (tmp_path / "k.png").stat().st_size > 0
  with pytest.raises(ValueError, match="must be >= 1, got 0"):
    eval_lib.evaluate(ed, state, m.params, d, n_edits=4, k=0)


def test_evaluate_matches_a_brute_force_check_when_alpha_is_zero(synth_setup):
  """With alpha = 0 the edited model is the base model, so each metric must equal a direct
  argmax check of the base model, and the drawdown must be exactly 0."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  state = ed.init(jax.random.PRNGKey(0))
  state = state._replace(params={**state.params, "alpha": jnp.zeros_like(state.params["alpha"])})
  n = 6
  res = eval_lib.evaluate(ed, state, m.params, d, n_edits=n, k=1)
  fwd = jax.jit(lambda b: m.logits(m.params, b))

  def success(view):
    hits = []
    for i in range(n):
      row = {k: v for k, v in view.take([i]).items() if not k.startswith("read_")}  # all positions
      pred = np.asarray(fwd(row))[0].argmax(-1)
      lab = row["labels"][0]
      pos = np.nonzero(lab != -100)[0]
      hits.append(all(pred[p - 1] == lab[p] for p in pos))
    return float(np.mean(hits))

  assert res["n_test_edits"] == n
  assert res["edit_success"] == pytest.approx(success(d.equiv))
  assert res["reliability"] == pytest.approx(success(d.edit))
  assert res["locality_acc_pre"] == pytest.approx(success(d.loc))
  assert res["locality_acc_post"] == res["locality_acc_pre"] and res["locality_drawdown"] == 0.0


def test_lifelong_stream_matches_a_loop(synth_setup, strong, tmp_path):
  m, d = synth_setup["model"], synth_setup["data"]
  ed, state = strong
  k, n, every = 2, 10, 2  # 5 batches: measured after batches 2, 4 and 5 (the last)
  res = eval_lib.evaluate_stream(ed, state, m.params, d, k=k, n_edits=n, every=every, n_loc=6, chunk=4)
  params, want = m.params, []
  for b in range(n // k):
    params, _ = ed.jit_edit(state, params, d.edit.take(np.arange(b * k, (b + 1) * k)))
    if (b + 1) % every == 0 or b + 1 == n // k:
      done = np.arange((b + 1) * k)
      want.append({"edits": int((b + 1) * k), "edit_success": _success(m, params, d.equiv, done).mean(),
                   "reliability": _success(m, params, d.edit, done).mean(),
                   "locality_unchanged": np.mean(_unchanged(m, m.params, params, d.loc, range(6))),
                   "locality_drawdown": _success(m, m.params, d.loc, range(6)).mean()
                   - _success(m, params, d.loc, range(6)).mean()})
  assert [r["edits"] for r in res["curve"]] == [w["edits"] for w in want] == [4, 8, 10]
  for got, exp in zip(res["curve"], want):
    for key in ("edit_success", "reliability", "locality_unchanged", "locality_drawdown"):
      assert got[key] == pytest.approx(float(exp[key]), abs=1e-6), key
  assert max(w["reliability"] for w in want) > 0, "no edit succeeded: the comparison is vacuous"
  assert "| 10 |" in report.stream_table(res)
  assert report.plot_stream({"k=2": res}, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0
