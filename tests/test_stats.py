"""Masked running statistics: merging halves equals the whole, against a float64 reference."""

import chex
import jax.numpy as jnp
import numpy as np

from mend_jax import stats as stats_lib


def _random(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def test_stats_merge_of_halves_equals_whole_and_float64_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 7, 5)).astype(np.float32) * 3 + 1
  mask = rng.random((6, 7)) > 0.3
  whole = stats_lib.update(stats_lib.init(5), x, mask)
  halves = stats_lib.merge(stats_lib.from_batch(x[:3], mask[:3]), stats_lib.from_batch(x[3:], mask[3:]))
  chex.assert_trees_all_close(whole, halves, rtol=1e-5, atol=1e-5)
  rows = x.reshape(-1, 5)[mask.reshape(-1)].astype(np.float64)
  assert float(whole.count) == rows.shape[0]
  np.testing.assert_allclose(whole.mean, rows.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats_lib.std(whole), rows.std(0, ddof=1), rtol=1e-5)
  z = stats_lib.normalize(whole, jnp.asarray(rows, jnp.float32))
  np.testing.assert_allclose(np.asarray(z).mean(0), 0, atol=1e-5)
  # Masked-out rows (here: huge values) never reach the statistics.
  x2 = np.where(mask[..., None], x, 1e6).astype(np.float32)
  np.testing.assert_allclose(stats_lib.update(stats_lib.init(5), x2, mask).mean, whole.mean, rtol=1e-6)


def test_normalize_passes_through_before_two_tokens():
  x = jnp.asarray(_random(6, 3, 4))
  one = stats_lib.update(stats_lib.init(4), x[:1], jnp.ones((1,), bool))
  np.testing.assert_array_equal(np.asarray(stats_lib.normalize(one, x)), np.asarray(x))
