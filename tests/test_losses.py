"""Losses and metrics against references computed another way (float64 loops, hand-written
expected values), and at read positions against the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_logits, make_batch, tiny_model, with_read
from mend_jax import losses


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _random(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def test_causal_nll_matches_a_loop():
  logits = _random(0, 2, 5, 7)
  labels = np.array([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]], np.int32)
  total, n = 0.0, 0
  for b in range(2):
    for t in range(1, 5):  # label at t is predicted from position t-1
      if labels[b, t] != -100:
        total -= _log_softmax64(logits[b, t - 1])[labels[b, t]]
        n += 1
  got = losses.nll("causal_lm", jnp.asarray(logits), {"labels": jnp.asarray(labels)})
  np.testing.assert_allclose(float(got), total / n, rtol=1e-6)


def test_seq2seq_nll_is_not_shifted():
  logits = _random(1, 1, 3, 4)
  labels = np.array([[2, 0, -100]], np.int32)
  ref = -(_log_softmax64(logits[0, 0])[2] + _log_softmax64(logits[0, 1])[0]) / 2
  np.testing.assert_allclose(float(losses.nll("seq2seq", jnp.asarray(logits), {"labels": jnp.asarray(labels)})),
                             ref, rtol=1e-6)


def test_binary_nll_and_success():
  logits = np.array([2.0, -1.0, 0.5], np.float32)
  labels = np.array([1, 1, 0], np.int32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ref = -np.mean(np.where(labels == 1, np.log(p), np.log(1 - p)))
  b = {"labels": jnp.asarray(labels)}
  np.testing.assert_allclose(float(losses.nll("binary", jnp.asarray(logits), b)), ref, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(losses.exact_match("binary", jnp.asarray(logits), b)), [1, 0, 0])


def test_exact_match_needs_every_label_token():
  # Vocabulary 3; argmax at positions 0..2 is [1, 2, 0].
  logits = np.zeros((3, 4, 3), np.float32)
  for t, k in enumerate([1, 2, 0]):
    logits[:, t, k] = 5.0
  labels = np.array([[-100, 1, 2, -100],     # both right -> success
                     [-100, 1, 1, -100],     # second wrong -> failure
                     [-100, -100, -100, -100]], np.int32)  # nothing scored -> failure
  got = losses.exact_match("causal_lm", jnp.asarray(logits), {"labels": jnp.asarray(labels)})
  np.testing.assert_array_equal(np.asarray(got), [1, 0, 0])


def test_outer_loss_metrics_do_not_depend_on_the_kl_positions():
  """kl_positions="all" projects every position of the locality batch, "answer" only its read
  positions; the locality agreement over the answer tokens must be the same either way."""
  model = tiny_model("gpt2")
  edit = with_read(model, make_batch(model, seed=1, batch=3, length=8, n_labels=3))[1]
  loc = with_read(model, make_batch(model, seed=2, batch=4, length=8, n_labels=3, pad=1))[1]
  assert loc["read_pos"].shape[1] > 1  # several answer tokens (a wrong alignment cannot broadcast)
  batch = {"edit": edit, "equiv": edit, "loc": loc}
  # An edited model that changes some locality predictions and keeps others.
  edited = jax.tree_util.tree_map(lambda x: x * 1.3, model.params)
  out = {}
  for mode in ("answer", "all"):
    _, m = losses.post_edit_loss(model, edited, model.params, batch, losses.Objective(kl_positions=mode))
    out[mode] = jax.device_get(m)
  base = jit_logits(model)(model.params, loc)
  new = jit_logits(model)(edited, loc)
  ref = float(np.mean(np.asarray(losses.exact_match("causal_lm", new, loc) == losses.exact_match("causal_lm", base, loc))))
  assert out["all"]["loc_agree"] == out["answer"]["loc_agree"] == ref
  assert out["all"]["loss_loc"] != out["answer"]["loss_loc"]  # the KLs themselves read other positions


def test_is_argmax_equals_numpy_argmax_with_ties_and_nans():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, size=(300, 5, 9)).astype(np.float32)  # small integers: many ties
  x[rng.random(x.shape) < 0.03] = np.nan
  labels = rng.integers(0, 9, size=(300, 5))
  labels[::2] = np.argmax(x[::2], -1)  # numpy's argmax: the first NaN, else the first maximum
  ref = np.argmax(x, -1) == labels
  got = np.asarray(losses.is_argmax(jnp.asarray(x), jnp.asarray(labels)))
  assert 0.3 < ref.mean() < 0.8 and np.isnan(x).any(axis=-1).mean() > 0.1
  np.testing.assert_array_equal(got, ref)


def test_kl_gradient_equals_float64_finite_differences_and_autodiff():
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(3, 7)) * 3, rng.normal(size=(3, 7)) * 3
  w = rng.normal(size=3)

  def ref(q64):  # float64 numpy KL(p || q) weighted per row
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q64 - np.log(np.exp(q64).sum(-1, keepdims=True))
    return float(np.sum(w * np.sum(np.exp(lp) * (lp - lq), -1)))

  f = lambda q32: jnp.sum(jnp.asarray(w, jnp.float32) * losses.categorical_kl(jnp.asarray(p, jnp.float32), q32))
  np.testing.assert_allclose(float(f(jnp.asarray(q, jnp.float32))), ref(q), rtol=1e-5)
  g = np.asarray(jax.grad(f)(jnp.asarray(q, jnp.float32)))
  eps = 1e-6
  fd = np.zeros_like(q)
  for idx in np.ndindex(q.shape):
    e = np.zeros_like(q)
    e[idx] = eps
    fd[idx] = (ref(q + e) - ref(q - e)) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)
  # The base logits get no gradient (the frozen reference), and the value equals plain autodiff's KL.
  gp = jax.grad(lambda p32: jnp.sum(losses.categorical_kl(p32, jnp.asarray(q, jnp.float32))))(jnp.asarray(p, jnp.float32))
  np.testing.assert_array_equal(np.asarray(gp), 0.0)


def test_label_logprob_and_its_gradient_equal_float64_references():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, 3, 9)) * 4
  z[0, 0] += 500.0  # large logits: the max shift must keep them finite
  labels = rng.integers(0, 9, size=(2, 3))
  w = rng.normal(size=(2, 3))

  def ref(z64):
    return float(np.sum(w * np.take_along_axis(_log_softmax64(z64), labels[..., None], -1)[..., 0]))

  f = lambda z32: jnp.sum(jnp.asarray(w, jnp.float32) * losses.label_logprob(z32, jnp.asarray(labels, jnp.int32)))
  np.testing.assert_allclose(float(f(jnp.asarray(z, jnp.float32))), ref(z), rtol=1e-5)
  g = np.asarray(jax.grad(f)(jnp.asarray(z, jnp.float32)))
  fd = np.zeros_like(z)
  for idx in np.ndindex(z.shape):
    e = np.zeros_like(z)
    e[idx] = 1e-6
    fd[idx] = (ref(z + e) - ref(z - e)) / 2e-6
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)
  # A row of -inf logits gives NaN, as log_softmax does.
  bad = jnp.full((1, 4), -jnp.inf)
  assert np.isnan(float(losses.label_logprob(bad, jnp.zeros((1,), jnp.int32))[0]))


def test_locality_kl_matches_a_loop_and_respects_the_mask():
  p, q = _random(2, 2, 4, 6), _random(3, 2, 4, 6)
  mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], np.int32)
  kls = [np.sum(np.exp(_log_softmax64(p[b, t])) * (_log_softmax64(p[b, t]) - _log_softmax64(q[b, t])))
         for b in range(2) for t in range(4) if mask[b, t]]
  batch = {"attention_mask": jnp.asarray(mask), "labels": jnp.zeros((2, 4), jnp.int32)}
  got = losses.locality_kl("causal_lm", jnp.asarray(p), jnp.asarray(q), batch)
  np.testing.assert_allclose(float(got), np.mean(kls), rtol=1e-5)
  assert float(losses.locality_kl("causal_lm", jnp.asarray(p), jnp.asarray(p), batch)) == pytest.approx(0, abs=1e-6)


def test_bernoulli_kl_equals_two_class_categorical_kl():
  p, q = _random(4, 5), _random(5, 5)
  two = lambda x: np.stack([np.zeros_like(x), x], -1)  # softmax([0, x]) = [1 - sigmoid(x), sigmoid(x)]
  lp, lq = _log_softmax64(two(p)), _log_softmax64(two(q))
  ref = np.mean(np.sum(np.exp(lp) * (lp - lq), -1))
  got = losses.locality_kl("binary", jnp.asarray(p), jnp.asarray(q), {"labels": jnp.zeros(5)})
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


# One family per way of calling the head: tied via apply (gpt2), tied and rescaled (t5), with a
# final bias (bart), untied (llama).
@pytest.mark.parametrize("name", ["gpt2", "t5", "bart", "llama"])
def test_losses_at_read_positions_equal_full(name):
  model = tiny_model(name)
  batch = make_batch(model, seed=7, batch=3, length=8, n_labels=3, pad=2)
  t = batch["labels"].shape[1]
  kl = np.zeros((3, t), np.int32)
  kl[:, 1:4] = 1  # KL positions that are not all label positions
  full_b, read_b = with_read(model, batch, kl)
  other = jax.tree_util.tree_map(lambda x: x * 1.1, model.params)  # a second model for the KL
  def metrics(p, q, b):
    lp, lq = model.logits(p, b), model.logits(q, b)
    return {"nll": losses.nll(model.task, lp, b), "per_edit": losses.nll_per_edit_sum(model.task, lp, b),
            "em": losses.exact_match(model.task, lp, b), "kl": losses.locality_kl(model.task, lp, lq, b),
            "shape": jnp.zeros(lp.shape[:2])}

  fn = jax.jit(metrics)
  a, r = fn(model.params, other, full_b), fn(model.params, other, read_b)
  assert r["shape"].shape[1] < a["shape"].shape[1]  # fewer positions were projected
  assert float(a["kl"]) > 0
  for k in ("nll", "per_edit", "em", "kl"):
    np.testing.assert_allclose(np.asarray(r[k]), np.asarray(a[k]), rtol=2e-5, atol=1e-7, err_msg=k)


def test_changed_to_targets_counts_only_changes_to_a_new_target():
  # Causal LM: logits at position t predict labels[t + 1]; labels 1..3 are scored in row 0, none in row 1.
  labels = jnp.asarray([[-100, 5, 6, 7], [-100, -100, -100, -100]])
  batch = {"labels": labels, "input_ids": jnp.zeros((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), jnp.int32)}
  before = jax.nn.one_hot(jnp.asarray([[5, 6, 7, 0], [1, 1, 1, 1]]), 10)
  after = jax.nn.one_hot(jnp.asarray([[5, 2, 9, 3], [9, 9, 9, 9]]), 10)  # position 1 -> 2 (no target), 2 -> 9 (a target)
  targets = jnp.asarray([[-100, 9, 3], [-100, -100, 4]])  # 3 is a target but position 3 is not scored
  got = losses.changed_to_targets("causal_lm", before, after, batch, targets)
  np.testing.assert_allclose(np.asarray(got), [1 / 3, 0.0])
  agree = losses.prediction_agreement("causal_lm", before, after, batch)
  np.testing.assert_allclose(np.asarray(agree), [1 / 3, 1.0])
  # Unchanged predictions never count, even when they are a target token.
  same = losses.changed_to_targets("causal_lm", after, after, batch, targets)
  np.testing.assert_array_equal(np.asarray(same), [0.0, 0.0])
