"""Losses, metrics and batch encoding against references computed another way (float64 loops,
hand-written expected values)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax import data as data_lib
from mend_jax import losses
from mend_jax import stats as stats_lib


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


def test_normalize_passes_through_before_two_tokens():
  x = jnp.asarray(_random(6, 3, 4))
  one = stats_lib.update(stats_lib.init(4), x[:1], jnp.ones((1,), bool))
  np.testing.assert_array_equal(np.asarray(stats_lib.normalize(one, x)), np.asarray(x))


class _WordTok:
  """A minimal tokenizer with fixed ids, so expected arrays can be written by hand."""

  vocab = {"<eos>": 0, "the": 1, "capital": 2, "of": 3, "x": 4, "is": 5, "paris": 6, "new": 7, "york": 8}
  bos_token_id = 0
  pad_token_id = 0
  eos_token_id = 0

  def encode(self, text, add_special_tokens=False):
    return [self.vocab[w] for w in text.lower().split()]


def test_encode_pairs_by_hand():
  t = data_lib.encode_pairs(_WordTok(), ["The capital of X is", "X is"], ["Paris", "New York"], 8)
  np.testing.assert_array_equal(t.input_ids, [[0, 1, 2, 3, 4, 5, 6, 0], [0, 4, 5, 7, 8, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[-100] * 6 + [6, -100], [-100] * 3 + [7, 8] + [-100] * 3])
  # The KL reads the positions whose next-token prediction is a target token.
  np.testing.assert_array_equal(t.kl_mask, [[0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
