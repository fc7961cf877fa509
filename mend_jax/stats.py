"""Masked running mean/variance as a pure, mergeable pytree (Chan et al.'s parallel update).

MEND normalises each dimension of u and of delta with statistics accumulated over the training
set and sequence positions. Tokens excluded by the mask (padding, rows that carry no gradient)
never enter the statistics. `merge(a, b)` of two halves equals `update` on the whole, so the
statistics can be accumulated across batches, devices or hosts in any grouping.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# The official code divides by (std + 1e-7) with the sample (k - 1) standard deviation.
EPS = 1e-7


class RunningStats(NamedTuple):
  """count: [] float32 number of tokens seen; mean: [d]; m2: [d] sum of squared deviations."""

  count: jax.Array
  mean: jax.Array
  m2: jax.Array


def init(dim: int) -> RunningStats:
  """Empty statistics of dimension `dim` (count 0)."""
  return RunningStats(jnp.zeros((), jnp.float32), jnp.zeros((dim,), jnp.float32),
                      jnp.zeros((dim,), jnp.float32))


def merge(a: RunningStats, b: RunningStats) -> RunningStats:
  """Statistics of the union of the two token sets."""
  n = a.count + b.count
  safe_n = jnp.maximum(n, 1.0)
  diff = b.mean - a.mean
  mean = a.mean + diff * (b.count / safe_n)
  m2 = a.m2 + b.m2 + diff * diff * (a.count * b.count / safe_n)
  return RunningStats(n, mean, m2)


def from_batch(x: jax.Array, mask: jax.Array) -> RunningStats:
  """Statistics of the masked rows of x. x: [..., d]; mask: x.shape[:-1] bool."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  w = mask.reshape(-1).astype(jnp.float32)[:, None]
  n = jnp.sum(w)
  mean = jnp.sum(x * w, 0) / jnp.maximum(n, 1.0)
  m2 = jnp.sum(w * (x - mean) ** 2, 0)
  return RunningStats(n, mean, m2)


def update(s: RunningStats, x: jax.Array, mask: jax.Array) -> RunningStats:
  """`s` with the masked rows of x ([..., d], mask x.shape[:-1]) added."""
  return merge(s, from_batch(x, mask))


def std(s: RunningStats) -> jax.Array:
  """Sample standard deviation (divides by count - 1, as the official code)."""
  return jnp.sqrt(s.m2 / jnp.maximum(s.count - 1.0, 1.0))


def normalize(s: RunningStats, x: jax.Array) -> jax.Array:
  """(x - mean) / (std + EPS). With fewer than 2 tokens seen, x is returned unchanged (the
  statistics are not defined yet; the official code raises there, which a jitted step cannot)."""
  ready = s.count >= 2.0
  mean = jnp.where(ready, s.mean, 0.0)
  scale = jnp.where(ready, std(s) + EPS, 1.0)
  return (x - mean) / scale
