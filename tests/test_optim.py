"""The fused editor optimizer against optax's chain of the same transformations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mend_jax import optim


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"net": {"w": jax.random.normal(k[0], (5, 4)), "b": jax.random.normal(k[1], (4,))},
          "alpha": {"l0": jax.random.normal(k[2], (3,)), "l1": jnp.ones(())}}


def _labels(params):  # "alpha" names a whole subtree: a prefix of the parameters, as optax allows
  return {"net": jax.tree_util.tree_map(lambda _: "net", params["net"]), "alpha": "alpha"}


def _reference(lrs, max_norm, accumulate):
  inner = optax.chain(optax.clip_by_global_norm(max_norm),
                      optax.multi_transform({k: optax.adam(v) for k, v in lrs.items()}, _labels))
  return optax.MultiSteps(inner, every_k_schedule=accumulate) if accumulate > 1 else inner


@pytest.mark.parametrize("accumulate", [1, 3])
def test_matches_optax_chain(accumulate):
  lrs = {"net": optax.linear_schedule(0.0, 1e-2, 4), "alpha": 3e-2}
  max_norm = 2.0
  ours = optim.ClippedAdam(lrs, _labels, max_norm, accumulate)
  ref = _reference(lrs, max_norm, accumulate)
  p_ours = p_ref = _params()
  s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
  step = jax.jit(ours.apply)
  clipped = 0
  for i in range(12):
    # Gradients alternate between small (no clipping) and large (clipped to max_norm).
    scale = 0.1 if i % 2 else 10.0
    g = jax.tree_util.tree_map(lambda x: scale * jnp.sin(x * (i + 1)), p_ref)
    clipped += float(optax.global_norm(g)) > max_norm
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    p_ours, s_ours = step(g, s_ours, p_ours)
    chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-6, atol=1e-7)
  assert clipped >= 5
  # The parameters really moved, by the updates of 12 // accumulate Adam steps.
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p_ours, _params())
  assert min(jax.tree_util.tree_leaves(moved)) > 1e-3
  assert int(s_ours.count) == 12 // accumulate


def test_accumulation_holds_parameters_between_updates():
  ours = optim.ClippedAdam({"net": 1e-2, "alpha": 1e-2}, _labels, 100.0, accumulate=3)
  p = _params()
  s = ours.init(p)
  g = jax.tree_util.tree_map(jnp.ones_like, p)
  for _ in range(2):
    p2, s = ours.apply(g, s, p)
    chex.assert_trees_all_equal(p2, p)
  p3, s = ours.apply(g, s, p)
  # First Adam step on a constant gradient: every parameter moves by lr (bias-corrected m / sqrt(v) = 1).
  np.testing.assert_allclose(np.asarray(p["net"]["w"] - p3["net"]["w"]), 1e-2, rtol=1e-5)
  chex.assert_trees_all_equal(s.acc, jax.tree_util.tree_map(jnp.zeros_like, p))
  assert int(s.mini_step) == 0
