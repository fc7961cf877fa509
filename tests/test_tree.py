"""Leaves by path: reading, replacing (shape and dtype kept, other leaves shared), finiteness."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax import tree

PARAMS = {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros((3,))}, "b": {"kernel": jnp.arange(4.0).reshape(2, 2)}}


def test_flatten_round_trips_and_get_leaves_by_path():
  flat = tree.flatten(PARAMS)
  assert sorted(flat) == ["a/bias", "a/kernel", "b/kernel"]
  chex.assert_trees_all_equal(tree.unflatten(flat), PARAMS)
  got = tree.get_leaves(PARAMS, ["b/kernel"])
  np.testing.assert_array_equal(got["b/kernel"], [[0, 1], [2, 3]])
  with pytest.raises(KeyError, match="'c/kernel' is not in the parameter tree"):
    tree.get_leaves(PARAMS, ["c/kernel"])


def test_replace_leaves_keeps_dtype_shape_and_shares_the_rest():
  bf = {"w": jnp.ones((2, 2), jnp.bfloat16), "v": jnp.zeros(3)}
  new = tree.replace_leaves(bf, {"w": jnp.full((2, 2), 0.5, jnp.float32)})
  assert new["w"].dtype == jnp.bfloat16 and float(new["w"][0, 0]) == 0.5
  assert new["v"] is bf["v"]  # untouched leaves are the input's own arrays
  assert float(bf["w"][0, 0]) == 1.0  # the input is not changed
  with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(2, 2\)"):
    tree.replace_leaves(bf, {"w": jnp.zeros(3)})
  with pytest.raises(KeyError, match="'x' is not in the parameter tree"):
    tree.replace_leaves(bf, {"x": jnp.zeros(3)})


def test_all_finite_and_num_elements():
  assert bool(tree.all_finite(PARAMS))
  assert bool(tree.all_finite({}))  # no floating leaf: nothing is non-finite
  assert bool(tree.all_finite({"step": jnp.zeros((), jnp.int32)}))
  assert not bool(tree.all_finite({**PARAMS, "c": jnp.array([1.0, jnp.inf])}))
  assert not bool(tree.all_finite({"c": jnp.array([jnp.nan])}))
  assert tree.num_elements(PARAMS) == 6 + 3 + 4
