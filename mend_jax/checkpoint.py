"""Orbax checkpoints of trained editors, automatic resume, and `load_editor` for research code.

A work directory holds two CheckpointManagers: workdir/checkpoints (the latest training state, for
resume) and workdir/best (the best state by validation loss). Each checkpoint has three items:
  state:  the full TrainState (editor params, its aux state such as MEND's normalisation
          statistics with their counts, optimizer state, step, rng, skipped-step count);
  editor: just {"params", "aux"} (what `load_editor` restores);
  meta:   JSON: the experiment config, the algorithm's name and config, the model family and its
          editable layers with their shapes (checked on restore), plus loop bookkeeping.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from mend_jax import algs
from mend_jax.mend import check_batch
from mend_jax.models import EditableModel


def model_fingerprint(editor) -> dict:
  m = editor.model
  return {
      "alg": editor.name,
      "family": m.family.name,
      "layers": [[l.path, l.d_in, l.d_out] for l in m.layers],
      "editor_config": dataclasses.asdict(editor.cfg),
  }


class CheckpointMismatch(ValueError):
  """A checkpoint made for another model or other editable layers."""


def check_fingerprint(meta: Mapping, editor, where: str) -> None:
  want = model_fingerprint(editor)
  if meta.get("family") != want["family"]:
    raise CheckpointMismatch(
        f"checkpoint {where} was made for a {meta.get('family')!r} model, not {want['family']!r}")
  got_layers = [list(x) for x in meta.get("layers", [])]
  if got_layers != want["layers"]:
    raise CheckpointMismatch(
        f"checkpoint {where} edits layers {[(p, a, b) for p, a, b in got_layers]}, but this model's "
        f"editable layers are {[tuple(x) for x in want['layers']]}")


def _manager(path: str, create: bool) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
  return ocp.CheckpointManager(os.path.abspath(path), options=opts)


class Checkpoints:
  """Latest + best managers of one work directory."""

  def __init__(self, workdir: str, meta: Mapping):
    self.meta = dict(meta)
    self.latest = _manager(os.path.join(workdir, "checkpoints"), True)
    self.best = _manager(os.path.join(workdir, "best"), True)
    self.workdir = workdir

  def _save(self, mngr, step: int, state, extra: Mapping | None):
    meta = {**self.meta, **(extra or {}), "step": int(step)}
    mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        editor=ocp.args.StandardSave({"params": state.params, "aux": state.aux}),
        meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()

  def save_latest(self, step, state, extra=None):
    if self.latest.latest_step() == int(step):
      return
    self._save(self.latest, step, state, extra)

  def save_best(self, step, state):
    self._save(self.best, step, state, None)

  def restore_latest(self, abstract_state) -> tuple[Any, dict]:
    """(state, meta) from the latest checkpoint, or (abstract_state, {}) if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return abstract_state, {}
    meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    for key in ("alg", "family", "layers", "editor_config"):
      if meta.get(key) != self.meta.get(key):
        raise CheckpointMismatch(
            f"work directory {self.workdir!r} holds a checkpoint whose {key} is {meta.get(key)!r}, but this "
            f"run's is {self.meta.get(key)!r}; use another --workdir or the same config")
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"], meta

  def close(self):
    self.latest.close()
    self.best.close()


def _resolve(path: str) -> str:
  for sub in ("best", "checkpoints"):
    cand = os.path.join(path, sub)
    if os.path.isdir(cand) and _manager(cand, False).latest_step() is not None:
      return cand
  if os.path.isdir(path):
    return path
  raise FileNotFoundError(f"no checkpoint at {path!r} (expected a work directory or a checkpoint directory)")


def read_meta(path: str) -> dict:
  """The JSON metadata of the checkpoint `load_editor(path, ...)` would restore."""
  ckpt_dir = _resolve(path)
  mngr = _manager(ckpt_dir, False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint at {path!r}")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


@dataclasses.dataclass
class LoadedEditor:
  """A trained editor, ready to use: `new_params, info = editor.edit(params, batch)` (jitted).

  alg: the algorithm object (MEND, ENN, KE, FT, FT+KL; see `mend_jax.algs`); state: its state.
  The edit starts from `alg.pre_edit_params(state, params)`: `params` itself, except for ENN,
  whose training changed the model (its trained copy is in the state)."""

  alg: Any
  state: Any
  meta: dict

  @property
  def mend(self):  # the name research code used before the other algorithms existed
    return self.alg

  def edit(self, params, batch, **kwargs):
    """Checks the batch on the host (clear errors), then runs the jitted edit."""
    check_batch(self.alg.model, batch)
    return _jitted_edit(self.alg, tuple(sorted(kwargs.items())))(self.state, params, batch)


@functools.lru_cache(maxsize=32)
def _jitted_edit(alg, kwargs):
  jitted = algs.jit_edit(alg, from_base=True, static_argnames=tuple(k for k, _ in kwargs))
  return lambda state, params, batch: jitted(state, params, batch, **dict(kwargs))


def load_editor(path: str, model: EditableModel) -> LoadedEditor:
  """Restores the editor saved under `path` (a work directory: its best checkpoint, else its
  latest; or a checkpoint directory) for `model`. Raises CheckpointMismatch if the checkpoint was
  made for another model family or other editable layers."""
  ckpt_dir = _resolve(path)
  mngr = _manager(ckpt_dir, False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint at {path!r}")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  editor = algs.make_alg(meta.get("alg", "mend"), model, meta["editor_config"])
  check_fingerprint(meta, editor, repr(path))
  abstract = jax.eval_shape(editor.init, jax.random.PRNGKey(0), model.params)
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                  {"params": abstract.params, "aux": abstract.aux})
  restored = mngr.restore(step, args=ocp.args.Composite(editor=ocp.args.StandardRestore(target)))["editor"]
  return LoadedEditor(editor, type(abstract)(restored["params"], restored["aux"]), meta)


def save_untrained(editor, base_params, workdir: str, seed: int, meta: Mapping) -> dict:
  """For editors with nothing to train (FT, FT+KL): saves their initial state as the work
  directory's checkpoint, so evaluation, scripts/edit.py and `load_editor` treat every algorithm
  alike. Returns a training summary with zero steps."""
  state = jax.jit(editor.init)(jax.random.PRNGKey(seed), base_params)
  mngr = Checkpoints(workdir, {**dict(meta), **model_fingerprint(editor)})
  mngr.save_best(0, state)
  mngr.close()
  return {"steps": 0, "best_val_loss": None, "stopped_early": False, "n_skipped": 0, "train_time_s": 0.0}
