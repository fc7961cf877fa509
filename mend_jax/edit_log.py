"""Applied edits as objects: a log of low-rank patches that can be listed, reverted, saved and
exported as adapters.

Every MEND edit changes each edited kernel by a low-rank matrix, left @ right (`MEND.patch`: the
pseudo-activation and scaled pseudo-delta factors). The log keeps those factors per edit, with the
prompts, targets and update norms, and the edited kernels as they were before its first edit and
before its last one:

  log = EditLog(editor, state)
  params = log.apply(params, batch, prompts=["The capital of France is"], targets=["Lyon"])
  log.list()                                   # [{id, prompts, targets, norms, rank}, ...]
  params, err = log.revert(params, edit_id)    # without that edit
  adapters = log.adapter()                     # {path: (A, B)}: kernel = base kernel + A @ B
  log.save("runs/edits"); log = EditLog.load("runs/edits", editor, state)

Reverting the last edit restores the kernels saved before it (bit-identical). Reverting an
earlier one subtracts its patch in float32; `err` is the largest difference from the base
kernels plus the remaining patches recomputed in float64 (float32 rounding: about 1e-7 of the
kernels' scale per edit applied since).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mend_jax import models, report, tree
from mend_jax.editors.base import EditorState
from mend_jax.editors.mend import MEND


@dataclasses.dataclass(frozen=True)
class Patch:
  """One applied edit. factors: {kernel path: (left [rows, r], right [r, cols])} (float32), the
  kernel's change being left @ right; norms: {path: Frobenius norm of that change}."""

  edit_id: int
  prompts: tuple[str, ...]
  targets: tuple[str, ...]
  factors: Mapping[str, tuple[np.ndarray, np.ndarray]]
  norms: Mapping[str, float]


@functools.lru_cache(maxsize=16)
def _patch_fn(editor: MEND):
  return jax.jit(editor.patch)


@jax.jit
def _add(w, left, right, sign):
  return (w.astype(jnp.float32) + sign * (left @ right)).astype(w.dtype)


class EditLog:
  """A log of the edits a MEND editor applied to one model (module docstring)."""

  def __init__(self, editor: MEND, state: EditorState):
    if not isinstance(editor, MEND):
      raise TypeError(f"EditLog records MEND edits (low-rank patches); got a {type(editor).__name__}")
    if editor.cfg.refine:
      raise ValueError(f"EditLog records low-rank patches; this editor refines its edits with {editor.cfg.refine} "
                       "FT+KL steps, which change whole matrices (use an editor with refine=0)")
    self.editor, self.state = editor, state
    self.patches: list[Patch] = []
    self._base: dict[str, np.ndarray] | None = None  # the edited kernels before the first edit
    self._before_last: dict[str, jax.Array] | None = None  # ... and before the last one
    self._next_id = 0

  @property
  def paths(self) -> tuple[str, ...]:
    return self.editor.model.layer_paths

  def apply(self, params, batch: Mapping[str, Any], prompts: Sequence[str] = (), targets: Sequence[str] = (),
            check: bool = True):
    """Edits `params` with `batch` (k edits at once, one patch) and records it. Returns the new
    params (only the edited kernels change)."""
    if check:
      models.check_batch(self.editor.model, batch)
    factors, info = _patch_fn(self.editor)(self.state, params, batch)
    if check and not bool(jnp.isfinite(info["loss_before"])):
      models.check_finite_params(params)
      raise ValueError(f"the edit loss at the starting point is {float(info['loss_before'])}; nothing was applied")
    kernels = tree.get_leaves(params, self.paths)
    if self._base is None:
      self._base = {p: np.asarray(jax.device_get(w)) for p, w in kernels.items()}
    factors = {p: (np.asarray(l), np.asarray(r)) for p, (l, r) in jax.device_get(factors).items()}
    patch = Patch(self._next_id, tuple(prompts), tuple(targets), factors,
                  {p: float(np.linalg.norm(l.astype(np.float64) @ r.astype(np.float64))) for p, (l, r) in factors.items()})
    new = {p: _add(kernels[p], *factors[p], 1.0) for p in self.paths}
    self._before_last = dict(kernels)
    self.patches.append(patch)
    self._next_id += 1
    return tree.replace_leaves(params, new)

  def list(self) -> list[dict]:
    """One row per applied edit, oldest first: id, prompts, targets, rank (token rows), norms."""
    return [{"id": p.edit_id, "prompts": list(p.prompts), "targets": list(p.targets),
             "rank": int(next(iter(p.factors.values()))[0].shape[1]), "norms": dict(p.norms)} for p in self.patches]

  def _index(self, edit_id: int) -> int:
    for i, p in enumerate(self.patches):
      if p.edit_id == edit_id:
        return i
    raise KeyError(f"no edit {edit_id} in this log; it holds {[p.edit_id for p in self.patches]}")

  def revert(self, params, edit_id: int):
    """`params` without edit `edit_id`. Returns (params, err): err 0.0 for the last edit (its
    kernels from before it, bit-identical), else the largest absolute difference between the
    result and the base kernels plus the remaining patches computed in float64."""
    i = self._index(edit_id)
    kernels = tree.get_leaves(params, self.paths)
    last = i == len(self.patches) - 1
    patch = self.patches.pop(i)
    if last and self._before_last is not None:
      new, err = dict(self._before_last), 0.0
    else:
      new = {p: _add(kernels[p], *patch.factors[p], -1.0) for p in self.paths}
      want = self._reference()
      err = max(float(np.max(np.abs(np.asarray(new[p], np.float64) - want[p]))) for p in self.paths)
    self._before_last = None  # the kernels before the new last edit are not kept
    return tree.replace_leaves(params, new), err

  def _reference(self) -> dict[str, np.ndarray]:
    """The base kernels plus every patch in the log, in float64."""
    out = {p: self._base[p].astype(np.float64) for p in self.paths}
    for patch in self.patches:
      for p, (l, r) in patch.factors.items():
        out[p] += l.astype(np.float64) @ r.astype(np.float64)
    return out

  def adapter(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every edit in the log as one low-rank adapter per kernel: {path: (A [rows, R], B [R, cols])}
    with R the total rank, so that kernel = base kernel + A @ B (float32)."""
    if not self.patches:
      return {}
    return {p: (np.concatenate([q.factors[p][0] for q in self.patches], axis=1),
                np.concatenate([q.factors[p][1] for q in self.patches], axis=0)) for p in self.paths}

  # ---------------------------------------------------------------- storage
  def save(self, path: str) -> str:
    """Writes the log (patches, base kernels, metadata) to directory `path` with Orbax, through a
    temporary directory renamed into place (an existing log there is replaced whole)."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    arrays = {"base": dict(self._base or {}),
              "patches": {str(p.edit_id): {k: {"left": l, "right": r} for k, (l, r) in p.factors.items()}
                          for p in self.patches}}
    meta = {"paths": list(self.paths), "next_id": self._next_id, "layer_config": self.editor.cfg.__dict__,
            "edits": [{"id": p.edit_id, "prompts": list(p.prompts), "targets": list(p.targets), "norms": p.norms}
                      for p in self.patches]}
    with ocp.PyTreeCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, "arrays"), _flat_keys(arrays))
    report.write_json(os.path.join(tmp, "edit_log.json"), meta)
    if os.path.isdir(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str, editor: MEND, state: EditorState) -> "EditLog":
    """The log saved in `path`, for `editor` (which must edit the same kernels)."""
    meta_path = os.path.join(path, "edit_log.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{path!r} holds no edit log (no edit_log.json)")
    with open(meta_path) as f:
      meta = json.load(f)
    if list(meta["paths"]) != list(editor.model.layer_paths):
      raise ValueError(f"the edit log in {path!r} edits {meta['paths']}; this editor edits {list(editor.model.layer_paths)}")
    with ocp.PyTreeCheckpointer() as ckpt:
      flat = ckpt.restore(os.path.join(os.path.abspath(path), "arrays"))
    arrays = _unflat_keys(flat)
    log = cls(editor, state)
    log._base = {p: np.asarray(arrays["base"][p]) for p in meta["paths"]} if arrays.get("base") else None
    for e in meta["edits"]:
      f = arrays["patches"][str(e["id"])]
      log.patches.append(Patch(e["id"], tuple(e["prompts"]), tuple(e["targets"]),
                               {p: (np.asarray(f[p]["left"]), np.asarray(f[p]["right"])) for p in meta["paths"]},
                               {p: float(v) for p, v in e["norms"].items()}))
    log._next_id = int(meta["next_id"])
    return log


# Orbax keys are directory names: kernel paths ("a/b/kernel") become "a|b|kernel".
def _flat_keys(tree_: Any) -> Any:
  if isinstance(tree_, Mapping):
    return {str(k).replace("/", "|"): _flat_keys(v) for k, v in tree_.items()}
  return np.asarray(tree_)


def _unflat_keys(tree_: Any) -> Any:
  if isinstance(tree_, Mapping):
    return {str(k).replace("|", "/"): _unflat_keys(v) for k, v in tree_.items()}
  return tree_
