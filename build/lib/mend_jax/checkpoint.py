"""Orbax checkpoints of editors: one CheckpointManager per work directory, automatic resume, and
`load_editor` for research code.

workdir/checkpoints holds the latest checkpoint (for resume) and the best one by validation loss
(for use), under one manager whose preservation policy keeps exactly those two (one when they
coincide). Every checkpoint has three items:
  editor: the EditorState (trained params and carried aux, e.g. MEND's normalisation statistics
          with their counts): what `load_editor` restores;
  train:  the rest of the TrainState (step, optimizer state, skipped-step count);
  meta:   JSON: the experiment config, the editor's name and config, the model family and its
          editable layers with their shapes (checked on restore), and loop bookkeeping.
A checkpoint is saved once per step, with its validation loss when it has one. Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mend_jax import editors, models
from mend_jax.editors.base import Editor, EditorState
from mend_jax.models import EditableModel

FINGERPRINT_KEYS = ("alg", "family", "layers", "editor_config")


class _QuietUntracked(logging.Filter):
  """Orbax warns on every save without a metric when it tracks the best checkpoint; here that is
  by design (only validation steps carry a loss), so that one message is dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUntracked())


def fingerprint(editor: Editor) -> dict:
  """What a checkpoint must agree on with the run or model that uses it: the editor's name and
  config, the model family, and the editable layers with their shapes."""
  m = editor.model
  return {
      "alg": editor.name,
      "family": m.family.name,
      "layers": [[l.path, l.d_in, l.d_out] for l in m.layers],
      "editor_config": dataclasses.asdict(editor.cfg),
  }


class CheckpointMismatch(ValueError):
  """A checkpoint made for another editor, model or set of editable layers."""


def check_fingerprint(meta: Mapping, editor: Editor, where: str) -> None:
  """Raises CheckpointMismatch when the checkpoint's model family or layers differ from editor's."""
  want = fingerprint(editor)
  if meta.get("family") != want["family"]:
    raise CheckpointMismatch(
        f"checkpoint {where} was made for a {meta.get('family')!r} model, not {want['family']!r}")
  got_layers = [list(x) for x in meta.get("layers", [])]
  if got_layers != want["layers"]:
    raise CheckpointMismatch(
        f"checkpoint {where} edits layers {[(p, a, b) for p, a, b in got_layers]}, but this model's "
        f"editable layers are {[tuple(x) for x in want['layers']]}")


def _manager(workdir: str, create: bool) -> ocp.CheckpointManager:
  policy = ocp_managers.AnyPreservationPolicy([
      ocp_managers.LatestN(n=1),
      ocp_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  opts = ocp.CheckpointManagerOptions(create=create, preservation_policy=policy,
                                      best_fn=lambda m: m["val_loss"], best_mode="min")
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=opts)


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """The checkpoints of one work directory (module docstring)."""

  def __init__(self, workdir: str, meta: Mapping):
    self.workdir = workdir
    self.meta = dict(meta)
    self.mngr = _manager(workdir, create=True)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, editor_state: EditorState, train_state: Any, extra: Mapping | None = None,
           val_loss: float | None = None) -> None:
    """Saves checkpoint `step` (once: a step already saved is left as is).

    Args:
      editor_state: the editor's EditorState.
      train_state: a pytree of the rest a resumed run needs (optimizer state, counters).
      extra: JSON-able bookkeeping stored in meta next to the run's own metadata.
      val_loss: the validation loss at this step, if validated (it then competes for best).
    """
    step = int(step)
    if step in self.mngr.all_steps():
      return
    meta = {**self.meta, **dict(extra or {}), "step": step}
    self.mngr.save(step, args=ocp.args.Composite(
        editor=ocp.args.StandardSave(editor_state),
        train=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(meta)), metrics=None if val_loss is None else {"val_loss": float(val_loss)})
    self.mngr.wait_until_finished()

  def restore(self, editor_shapes: EditorState, train_shapes: Any) -> tuple[EditorState, Any, dict]:
    """(editor state, train state, meta) of the latest checkpoint, restored into the given
    abstract trees (shapes and dtypes, e.g. from jax.eval_shape). Raises CheckpointMismatch if the
    checkpoint was made by another editor, model or layer set."""
    step = self.mngr.latest_step()
    meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    for key in FINGERPRINT_KEYS:
      if meta.get(key) != self.meta.get(key):
        raise CheckpointMismatch(
            f"work directory {self.workdir!r} holds a checkpoint whose {key} is {meta.get(key)!r}, but this "
            f"run's is {self.meta.get(key)!r}; use another --workdir or the same config")
    out = self.mngr.restore(step, args=ocp.args.Composite(
        editor=ocp.args.StandardRestore(_abstract(editor_shapes)),
        train=ocp.args.StandardRestore(_abstract(train_shapes))))
    return EditorState(*out["editor"]), out["train"], meta

  def close(self) -> None:
    self.mngr.close()


def _checkpoint_step(path: str) -> tuple[ocp.CheckpointManager, int]:
  """The manager of work directory `path` and the step `load_editor` uses: the best checkpoint by
  validation loss, else the latest."""
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(f"no checkpoint at {path!r} (expected a work directory holding checkpoints/)")
  mngr = _manager(path, create=False)
  step = mngr.best_step()
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint at {path!r}: {os.path.join(path, 'checkpoints')} is empty")
  return mngr, step


def read_meta(path: str) -> dict:
  """The JSON metadata of the checkpoint `load_editor(path, ...)` would restore."""
  mngr, step = _checkpoint_step(path)
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


@dataclasses.dataclass(frozen=True)
class LoadedEditor:
  """A trained editor, ready to use: `new_params, info = loaded.edit(params, batch)` (jitted).

  editor: the Editor (MEND, ENN, KE, FT, FT+KL); state: its EditorState; meta: the checkpoint's
  metadata. The edit starts from `editor.pre_edit_params(state, params)`: `params` itself, except
  for ENN, whose training changed the model (its trained copy is in the state)."""

  editor: Editor
  state: EditorState
  meta: dict

  def edit(self, params, batch: Mapping[str, Any], **static):
    """Checks the batch on the host (clear errors), then runs the jitted edit.
    Returns (new_params, info)."""
    models.check_batch(self.editor.model, batch)
    return editors.jit_edit(self.editor, from_base=True)(self.state, params, batch, **static)

  def with_loc_pool(self, loc_pool: Mapping[str, Any]) -> "LoadedEditor":
    """A copy whose state carries a locality pool (FT+KL samples from it; others ignore it)."""
    return dataclasses.replace(self, state=self.editor.with_loc_pool(self.state, loc_pool))


def load_editor(path: str, model: EditableModel) -> LoadedEditor:
  """Restores the editor saved in work directory `path` (its best checkpoint, else its latest)
  for `model`. Raises CheckpointMismatch if the checkpoint was made for another model family or
  other editable layers, FileNotFoundError if there is none."""
  mngr, step = _checkpoint_step(path)
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  editor = editors.make(meta.get("alg", "mend"), model, meta["editor_config"])
  check_fingerprint(meta, editor, repr(path))
  abstract = jax.eval_shape(editor.init, jax.random.PRNGKey(0), model.params)
  restored = mngr.restore(step, args=ocp.args.Composite(editor=ocp.args.StandardRestore(_abstract(abstract))))
  mngr.close()
  return LoadedEditor(editor, EditorState(*restored["editor"]), meta)


def save_untrained(editor: Editor, base_params, workdir: str, seed: int, meta: Mapping) -> dict:
  """For editors with nothing to train (FT, FT+KL): saves their initial state as the work
  directory's checkpoint (step 0), so evaluation, scripts and `load_editor` treat every editor
  alike. Returns a training summary with zero steps."""
  state = jax.jit(editor.init)(jax.random.PRNGKey(seed), base_params)
  mngr = Checkpoints(workdir, {**dict(meta), **fingerprint(editor)})
  mngr.save(0, state, {"step": jax.numpy.zeros((), jax.numpy.int32)})
  mngr.close()
  return {"steps": 0, "best_val_loss": None, "stopped_early": False, "n_skipped": 0, "train_time_s": 0.0}
