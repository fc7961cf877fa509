"""Parameter trees addressed by "/"-joined paths, and finiteness checks.

The bottom of the package: it imports nothing of mend_jax. A path names one leaf of a nested
dict, e.g. "transformer/h/5/mlp/c_fc/kernel"; editors select, read and replace leaves by path
(and regexes over paths select the editable layers, `mend_jax.models`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{path: leaf} of a nested dict (paths "/"-joined)."""
  return traverse_util.flatten_dict(tree, sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of a {path: leaf} mapping (inverse of `flatten`)."""
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def path_str(key_path) -> str:
  """The "/"-joined path of a jax key path (`jax.tree_util.tree_map_with_path`)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return SEP.join(parts)


def get_leaves(tree: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
  """{path: leaf} for the given paths. Raises KeyError naming a path the tree lacks."""
  flat = flatten(tree)
  out = {}
  for p in paths:
    if p not in flat:
      raise KeyError(f"parameter {p!r} is not in the parameter tree")
    out[p] = flat[p]
  return out


def replace_leaves(tree: Mapping[str, Any], new_leaves: Mapping[str, jax.Array]) -> dict:
  """A copy of the nested dict `tree` with the leaves at `new_leaves`' paths replaced.

  Each new value keeps the old leaf's dtype (cast) and must have its shape. Every other leaf of
  the result is the input's own array object (no copy).
  """
  flat = flatten(tree)
  for path, value in new_leaves.items():
    if path not in flat:
      raise KeyError(f"parameter {path!r} is not in the parameter tree")
    if tuple(flat[path].shape) != tuple(value.shape):
      raise ValueError(f"new value for {path!r} has shape {tuple(value.shape)}, expected {tuple(flat[path].shape)}")
    flat[path] = value.astype(flat[path].dtype)
  return unflatten(flat)


def all_finite(tree: Any) -> jax.Array:
  """[] bool: every floating-point leaf of `tree` is finite (True for a tree without one)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def num_elements(tree: Any) -> int:
  """Total number of elements over the leaves (works on abstract `jax.ShapeDtypeStruct` trees)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    n = 1
    for d in x.shape:
      n *= int(d)
    total += n
  return total
