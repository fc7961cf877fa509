"""Device meshes: base-model parameters sharded (FSDP), batches split over data, the editor replicated.

A mesh has two axes, ("data", "fsdp"). Base-model parameters are placed by an ordered list of
(regex, PartitionSpec) rules per model family, matched against "/"-joined parameter paths (the
first match wins): the embedding and every attention and MLP matrix is split over "fsdp" along
one of its dimensions, everything else (norms, biases, position tables) is replicated. A
dimension that the axis does not divide stays whole (that leaf is replicated). Edit and locality
batches are split over "data" along their first dimension when it divides, else replicated. The
editor's state is replicated, or split over "fsdp" by `editor_spec` for very wide editors.

Nothing else changes: the jitted edit, training step and evaluation take sharded arrays as they
take single-device ones, and XLA partitions them (GSPMD). Reductions over a sharded batch (MEND's
normalisation statistics, the losses) are computed over the whole batch, so the result equals the
single-device one up to floating-point summation order. With no mesh, nothing here is used.

  mesh = sharding.make_mesh(data=4, fsdp=2)          # 8 devices
  params = sharding.shard_params(model, model.params, mesh)
  batch = sharding.shard_batch(batch, mesh)
  new_params, info = editor.jit_edit(state, params, batch)   # edited kernels keep their sharding

Multi-host: call `jax.distributed.initialize()` in every process first; `make_mesh` then spans
every process's devices (jax.devices()), and each process feeds the same global batches.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mend_jax import tree
from mend_jax.models import EditableModel

AXES = ("data", "fsdp")
_ROW, _COL = P("fsdp", None), P(None, "fsdp")

# Per family: (regex over the parameter path, spec). Kernels in [in, out] layout (nn.Dense)
# split their output columns for the first matrix of a pair and their input rows for the second,
# so each pair has one sharded contraction; GPT-2's Conv1D kernels are [out, in]: the same split
# transposed. Embeddings split over the vocabulary.
_DENSE_RULES = (
    (r"(embed_tokens|shared|word_embeddings|wte)/embedding$", _ROW),
    (r"lm_head/kernel$", _COL),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|fc_in|q|k|v|wi|wi_0|wi_1|query|key|value)/kernel$", _COL),
    (r"(o_proj|out_proj|down_proj|fc2|fc_out|o|wo|dense)/kernel$", _ROW),
)
RULES: dict[str, tuple[tuple[str, P], ...]] = {
    "gpt2": (
        (r"wte/embedding$", _ROW),
        (r"(c_attn|c_fc)/kernel$", _ROW),
        (r"c_proj/kernel$", _COL),
    ),
    "gpt_neo": _DENSE_RULES,
    "gptj": _DENSE_RULES,
    "t5": _DENSE_RULES,
    "bart": _DENSE_RULES,
    "bert": _DENSE_RULES,
    "llama": _DENSE_RULES,
    "mistral": _DENSE_RULES,
    "gemma": _DENSE_RULES,
}


def make_mesh(data: int = 1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over the first data * fsdp devices (default: jax.devices(), every
  process's devices when jax.distributed is initialised).

  Raises:
    ValueError: a size below 1, or more devices asked for than there are.
  """
  for name, n in (("data", data), ("fsdp", fsdp)):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"mesh.{name} must be an integer >= 1, got {n!r}")
  devices = list(jax.devices() if devices is None else devices)
  if data * fsdp > len(devices):
    raise ValueError(f"a mesh of data={data} x fsdp={fsdp} needs {data * fsdp} devices; there are {len(devices)} "
                     f"({devices[0].platform}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "before jax starts simulates N")
  return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), AXES)


def _fits(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  for dim, axis in zip(shape, spec):
    if axis is not None and dim % mesh.shape[axis] != 0:
      return False
  return True


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, P]], mesh: Mesh) -> P:
  """The spec of the first rule whose regex matches `path` (re.search) and whose split divides
  `shape`; P() (replicated) if none does."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if _fits(spec, shape, mesh):
        return spec
      logging.info("sharding: %s %s is not divisible as %s on mesh %s; replicated", path, shape, spec,
                   dict(mesh.shape))
      return P()
  return P()


def param_specs(model: EditableModel, params, mesh: Mesh, rules: Sequence[tuple[str, P]] | None = None):
  """The PartitionSpec of every leaf of `params` (a tree like it), by `rules` (default: the
  model family's RULES)."""
  rules = RULES.get(model.family.name, _DENSE_RULES) if rules is None else rules
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(tree.path_str(path), tuple(x.shape), rules, mesh), params)


def param_shardings(model: EditableModel, params, mesh: Mesh, rules=None):
  """NamedShardings of every leaf of `params` (a tree like it); see `param_specs`."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(model, params, mesh, rules),
                                is_leaf=lambda x: isinstance(x, P))


def shard_params(model: EditableModel, params, mesh: Mesh, rules=None):
  """`params` placed on `mesh` by the family's rules (arrays or jax.ShapeDtypeStructs)."""
  shardings = param_shardings(model, params, mesh, rules)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  return jax.device_put(params, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a whole copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """P("data") when the first dimension divides over "data", else P() (replicated)."""
  if shape and mesh.shape["data"] > 1 and shape[0] % mesh.shape["data"] == 0:
    return P("data")
  return P()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh):
  """A batch (a dict of arrays, or a dict of such dicts: {"edit", "equiv", "loc"}) on `mesh`,
  each array split over "data" along its first dimension (`batch_spec`)."""
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(np.shape(x), mesh))), dict(batch))


def editor_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """For an editor split over "fsdp" (very wide editors): its largest dimension that the axis
  divides, else replicated."""
  n = mesh.shape["fsdp"]
  if len(shape) >= 2 and n > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % n == 0:
        return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def state_shardings(state, mesh: Mesh, shard_editor: bool = False):
  """Shardings of an editor or training state (a pytree of arrays or ShapeDtypeStructs):
  replicated, or split by `editor_spec` with shard_editor."""
  if not shard_editor:
    return jax.tree_util.tree_map(lambda _: replicated(mesh), state)
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, editor_spec(tuple(np.shape(x)), mesh)), state)


def place(state, shardings):
  """`state` (arrays or ShapeDtypeStructs) with the given shardings (a tree like it)."""
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state)):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return jax.device_put(state, shardings)


def describe(mesh: Mesh | None) -> str:
  """A short description, e.g. "4 x 2 (data x fsdp) of cpu", or "one device"."""
  if mesh is None:
    return "one device"
  return f"{mesh.shape['data']} x {mesh.shape['fsdp']} (data x fsdp) of {mesh.devices.flat[0].platform}"


def bytes_per_device(arrays) -> int:
  """The bytes of `arrays` stored on one device (the first), from their addressable shards."""
  total = 0
  for x in jax.tree_util.tree_leaves(arrays):
    shard = x.addressable_shards[0]
    total += math.prod(shard.data.shape) * x.dtype.itemsize
  return total


def match_placement(new: Mapping[str, jax.Array], like: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{path: array} with each array moved to the sharding of like[path] where that one spans
  several devices and differs (XLA may return an edited kernel laid out otherwise); single-device
  arrays are returned as they are."""
  out = {}
  for p, x in new.items():
    s = getattr(like[p], "sharding", None)
    if s is None or len(s.device_set) == 1 or x.sharding.is_equivalent_to(s, x.ndim):
      out[p] = x
    else:
      out[p] = jax.device_put(x, s)
  return out


def mesh_of(arrays) -> Mesh | None:
  """The mesh the arrays are placed on (that of the first with a NamedSharding over several
  devices), or None."""
  for x in jax.tree_util.tree_leaves(arrays):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and len(s.device_set) > 1:
      return s.mesh
  return None
