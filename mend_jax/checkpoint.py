"""Orbax checkpoints of editors: one CheckpointManager per work directory, automatic resume, and
`load_editor` for research code.

workdir/checkpoints holds the latest checkpoint (for resume) and the best one by validation loss
(for use), under one manager whose preservation policy keeps exactly those two (one when they
coincide). Every checkpoint has three items:
  editor: the EditorState (trained params and carried aux, e.g. MEND's normalisation statistics
          with their counts): what `load_editor` restores;
  train:  the rest of the TrainState (step, optimizer state, skipped-step count);
  meta:   strict JSON: the experiment config, the fingerprint (the editor's name and config, the
          model family, its editable layers with their shapes, and the base model's identity: a
          hash of its config and a checksum of its weights), loop bookkeeping, and a SHA-256 of
          every array of the two other items, checked on restore. Beside them, mend_jax_files.json holds
          the SHA-256 of every file of the step, checked before Orbax reads any.
A checkpoint is saved once per step, with its validation loss when it has one. Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact; leftovers of such a kill (temporary directories, a checkpoint the
policy no longer keeps) are removed when the work directory is opened for training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import signal
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mend_jax import editors, models, report, sharding, tree
from mend_jax.data import batches
from mend_jax.editors.base import Editor, EditorState
from mend_jax.models import EditableModel

FINGERPRINT_KEYS = ("alg", "family", "layers", "editor_config", "model")
# Keys of a Hugging Face config that say nothing about the computation (names, versions, output
# switches); the rest of the config is part of a model's identity.
_CONFIG_NOISE = frozenset({"_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
                           "_commit_hash", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
                           "_attn_implementation_autoset", "_attn_implementation_internal"})


class _QuietOrbax(logging.Filter):
  """Two Orbax warnings that are expected here are dropped: a save without a metric while it
  tracks the best checkpoint (only validation steps carry a loss, by design), and the merge of
  per-process files it skips for an empty item (FT's state holds no arrays)."""

  EXPECTED = ("did not provide metrics", "Skipping merge of OCDBT checkpoints")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(e in message for e in self.EXPECTED)


logging.getLogger("absl").addFilter(_QuietOrbax())


class CheckpointMismatch(ValueError):
  """A checkpoint made for another editor, model or set of editable layers."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: missing, truncated or corrupt files, or arrays whose
  checksums do not match."""


def crash_point(name: str, step: int | None = None) -> None:
  """Fault injection for the crash test: SIGKILLs this process when the environment variable
  MEND_JAX_KILL_AT is `name` or `name@step`. Points: compile, step, save, validate,
  after_val_save (train.py, this module), before_eval (experiment.py)."""
  want = os.environ.get("MEND_JAX_KILL_AT")
  if want and want in (name, f"{name}@{step}"):
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- identity and checksums
@functools.lru_cache(maxsize=64)
def _sampler(shape: tuple[int, ...], dtype, stride: int):
  return jax.jit(lambda x: x.reshape(-1)[::stride][:1024].astype(jnp.float32))


def model_identity(model: EditableModel, params) -> dict:
  """A cheap identity of a base model: {"name", "config" (hash of its Hugging Face config),
  "weights" (hash of up to 1024 evenly spaced values of every leaf, with its path and shape)}.
  Two models agree when config and weights do ("name" is for messages)."""
  cfg = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_NOISE}
  h = hashlib.sha256()
  for path, x in sorted(tree.flatten(params).items()):
    n = int(np.prod(x.shape)) if x.shape else 1
    sample = np.asarray(_sampler(tuple(x.shape), jnp.dtype(x.dtype), max(1, n // 1024))(jnp.asarray(x)))
    h.update(f"{path}:{tuple(x.shape)}".encode())
    h.update(sample.tobytes())
  return {"name": str(getattr(model.config, "_name_or_path", "") or model.family.name),
          "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
          "weights": h.hexdigest()[:16]}


def fingerprint(editor: Editor, base_params=None) -> dict:
  """What a checkpoint must agree on with the run that resumes it: the editor's name and config,
  the model family, the editable layers with their shapes, and the base model's identity
  (`model_identity` of base_params, default the model's own parameters)."""
  m = editor.model
  return {
      "alg": editor.name,
      "family": m.family.name,
      "layers": [[l.path, l.d_in, l.d_out] for l in m.layers],
      "editor_config": dataclasses.asdict(editor.cfg),
      "model": model_identity(m, m.params if base_params is None else base_params),
  }


def _same(key: str, a, b) -> bool:
  if key == "model":  # the name is for messages
    return isinstance(a, Mapping) and isinstance(b, Mapping) and all(a.get(k) == b.get(k) for k in ("config", "weights"))
  return a == b


def _describe(key: str, value) -> str:
  if key == "model" and isinstance(value, Mapping):
    return f"{value.get('name')!r} (config {value.get('config')}, weights {value.get('weights')})"
  return repr(value)


def check_fingerprint(meta: Mapping, editor: Editor, where: str, base_params=None) -> None:
  """For using a checkpoint on a model: raises CheckpointMismatch when the model family or the
  editable layers differ; warns when the base model itself differs (applying an editor to a
  related model can be deliberate)."""
  want = fingerprint(editor, base_params)
  if meta.get("family") != want["family"]:
    raise CheckpointMismatch(
        f"checkpoint {where} was made for a {meta.get('family')!r} model, not {want['family']!r}")
  got_layers = [list(x) for x in meta.get("layers", [])]
  if got_layers != want["layers"]:
    raise CheckpointMismatch(
        f"checkpoint {where} edits layers {[(p, a, b) for p, a, b in got_layers]}, but this model's "
        f"editable layers are {[tuple(x) for x in want['layers']]}")
  if "model" in meta and not _same("model", meta["model"], want["model"]):
    absl_logging.warning("checkpoint %s was trained on model %s; applying it to model %s", where,
                         _describe("model", meta["model"]), _describe("model", want["model"]))


def digest(tree_: Any) -> str:
  """SHA-256 of every array of a pytree (bytes, shapes, dtypes and structure)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(tree_)
  h.update(str(treedef).encode())
  for x in jax.device_get(leaves):
    a = np.asarray(x)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------- the manager
def _manager(workdir: str, create: bool) -> ocp.CheckpointManager:
  policy = ocp_managers.AnyPreservationPolicy([
      ocp_managers.LatestN(n=1),
      ocp_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  opts = ocp.CheckpointManagerOptions(create=create, preservation_policy=policy, best_fn=lambda m: m["val_loss"],
                                      best_mode="min", cleanup_tmp_directories=create)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=opts)


def _abstract(tree_):
  """The restore target of a tree of arrays or ShapeDtypeStructs: their shapes, dtypes and
  shardings; a leaf with no sharding is restored onto the first local device (not onto the mesh
  it was saved from)."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(x):
    x = ocp.utils.to_shape_dtype_struct(x)
    return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)

  return jax.tree_util.tree_map(target, tree_)


def _best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The step with the lowest validation loss, or None if no checkpoint has one."""
  scored = [(m["val_loss"], s) for s in mngr.all_steps() if (m := mngr.metrics(s)) and m.get("val_loss") is not None]
  return min(scored)[1] if scored else None


def _restore(mngr: ocp.CheckpointManager, step: int, where: str, **items):
  """mngr.restore of the given items of `step` after checking its files, with any failure as one
  CheckpointError line."""
  _check_files(mngr, step, where)
  try:
    return mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types; each means an unreadable file
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise CheckpointError(f"checkpoint {where} (step {step}) cannot be read: {type(e).__name__}: {first}") from None


FILES = "mend_jax_files.json"  # beside Orbax's items in a step directory: the SHA-256 of every file


def _file_digests(step_dir: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(step_dir):
    for f in files:
      path = os.path.join(root, f)
      rel = os.path.relpath(path, step_dir)
      if rel == FILES:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def _check_files(mngr: ocp.CheckpointManager, step: int, where: str) -> None:
  """Before Orbax reads a step: every file it had when saved is there, unchanged (a damaged file
  is one CheckpointError naming it, instead of errors from deep inside TensorStore). A step saved
  without the record (a kill right after Orbax finished) is left to the array checksums."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  record = os.path.join(step_dir, FILES)
  if not os.path.isfile(record):
    return
  with open(record, encoding="utf-8") as f:
    want = json.load(f)
  got = _file_digests(step_dir)
  for rel, digest_ in sorted(want.items()):
    if rel not in got:
      raise CheckpointError(f"checkpoint {where} (step {step}): file {rel} is missing")
    if got[rel] != digest_:
      raise CheckpointError(f"checkpoint {where} (step {step}): file {rel} does not match its checksum "
                            "(changed, truncated or damaged)")


def _verify(meta: Mapping, item: str, restored: Any, where: str, step: int) -> None:
  want = (meta.get("checksums") or {}).get(item)
  if want is None:
    raise CheckpointError(f"checkpoint {where} (step {step}) has no checksum for its {item!r} item")
  if digest(restored) != want:
    raise CheckpointError(f"checkpoint {where} (step {step}): the {item!r} arrays do not match their checksum "
                          "(the files were changed or damaged)")


class Checkpoints:
  """The checkpoints of one work directory, opened for training (module docstring)."""

  def __init__(self, workdir: str, meta: Mapping):
    self.workdir = workdir
    self.where = os.path.join(workdir, "checkpoints")
    self.meta = dict(meta)
    self.mngr = _manager(workdir, create=True)
    self._prune()

  def _prune(self) -> None:
    """Deletes checkpoints the policy does not keep (left by a kill between a save and Orbax's
    clean-up): everything but the latest and the best."""
    keep = {self.mngr.latest_step(), _best_step(self.mngr)}
    for step in self.mngr.all_steps():
      if step not in keep:
        self.mngr.delete(step)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, editor_state: EditorState, train_state: Any, extra: Mapping | None = None,
           val_loss: float | None = None) -> None:
    """Saves checkpoint `step` (once: a step already saved is left as is).

    Args:
      editor_state: the editor's EditorState.
      train_state: a pytree of the rest a resumed run needs (optimizer state, counters).
      extra: JSON-able bookkeeping stored in meta next to the run's own metadata.
      val_loss: the validation loss at this step, if validated (it then competes for best; a
        non-finite loss never does).
    """
    step = int(step)
    if step in self.mngr.all_steps():
      return
    meta = {**self.meta, **dict(extra or {}), "step": step,
            "checksums": {"editor": digest(editor_state), "train": digest(train_state)}}
    metrics = None if val_loss is None or not np.isfinite(val_loss) else {"val_loss": float(val_loss)}
    self.mngr.save(step, args=ocp.args.Composite(
        editor=ocp.args.StandardSave(editor_state),
        train=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(report.json_safe(meta))), metrics=metrics)
    crash_point("save", step)
    self.mngr.wait_until_finished()
    step_dir = os.path.join(str(self.mngr.directory), str(step))
    if os.path.isdir(step_dir):
      report.write_json(os.path.join(step_dir, FILES), _file_digests(step_dir))

  def restore(self, editor_shapes: EditorState, train_shapes: Any) -> tuple[EditorState, Any, dict]:
    """(editor state, train state, meta) of the latest checkpoint, restored into the given
    abstract trees (shapes and dtypes, e.g. from jax.eval_shape) and checked against their
    checksums. Raises CheckpointMismatch if the checkpoint was made by another editor, model or
    layer set (nothing is written then), CheckpointError if it cannot be read."""
    step = self.mngr.latest_step()
    meta = _restore(self.mngr, step, self.where, meta=ocp.args.JsonRestore())["meta"]
    check_run(meta, self.meta, self.workdir)
    out = _restore(self.mngr, step, self.where, editor=ocp.args.StandardRestore(_abstract(editor_shapes)),
                   train=ocp.args.StandardRestore(_abstract(train_shapes)))
    editor_state = EditorState(*out["editor"])
    _verify(meta, "editor", editor_state, self.where, step)
    _verify(meta, "train", out["train"], self.where, step)
    return editor_state, out["train"], meta

  def close(self) -> None:
    self.mngr.close()


def _with_defaults(alg, cfg):
  """An editor config as stored, with the fields added to its class since then at their defaults
  (they reproduce the behaviour the checkpoint was trained with)."""
  if alg not in editors.NAMES or not isinstance(cfg, Mapping):
    return cfg
  return {**dataclasses.asdict(editors.config_class(alg)()), **cfg}


def check_run(stored: Mapping, run: Mapping, workdir: str) -> None:
  """Raises CheckpointMismatch, naming the first difference, when a work directory's checkpoint
  (its meta `stored`) was made by a run whose fingerprint differs from `run`'s."""
  stored = {**stored, "editor_config": _with_defaults(stored.get("alg"), stored.get("editor_config"))}
  run = {**run, "editor_config": _with_defaults(run.get("alg"), run.get("editor_config"))}
  for key in FINGERPRINT_KEYS:
    if not _same(key, stored.get(key), run.get(key)):
      raise CheckpointMismatch(
          f"work directory {workdir!r} holds a checkpoint whose {key} is {_describe(key, stored.get(key))}, but "
          f"this run's is {_describe(key, run.get(key))}; use another --workdir (nothing was written)")


def has_checkpoint(workdir: str) -> bool:
  """Whether work directory `workdir` holds a checkpoint (a run there resumes from it)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  mngr = _manager(workdir, create=False)
  step = mngr.latest_step()
  mngr.close()
  return step is not None


def check_workdir(workdir: str, run_fingerprint: Mapping | None = None) -> None:
  """Before a run writes anything: `workdir` must be a directory (or not exist yet), and any
  checkpoint in it must come from a run with the same fingerprint (else CheckpointMismatch; no
  fingerprint given: only the path is checked)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir!r} is a file; expected a directory (or a new path)")
  if run_fingerprint is None or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  mngr = _manager(workdir, create=False)
  step = mngr.latest_step()
  if step is not None:
    meta = _restore(mngr, step, os.path.join(workdir, "checkpoints"), meta=ocp.args.JsonRestore())["meta"]
    check_run(meta, run_fingerprint, workdir)
  mngr.close()


# ---------------------------------------------------------------------------- using a saved editor
def _checkpoint_step(path: str) -> tuple[ocp.CheckpointManager, int]:
  """The manager of work directory `path` and the step `load_editor` uses: the best checkpoint by
  validation loss, else the latest (with a warning for a learned editor: it was never validated)."""
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(f"no checkpoint at {path!r} (expected a work directory holding checkpoints/)")
  mngr = _manager(path, create=False)
  step = _best_step(mngr)
  if step is None:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint at {path!r}: {os.path.join(path, 'checkpoints')} is empty")
    if step > 0:
      absl_logging.warning("work directory %s has no validated checkpoint; using the latest (step %d)", path, step)
  return mngr, step


def read_meta(path: str) -> dict:
  """The JSON metadata of the checkpoint `load_editor(path, ...)` would restore."""
  mngr, step = _checkpoint_step(path)
  return _restore(mngr, step, os.path.join(path, "checkpoints"), meta=ocp.args.JsonRestore())["meta"]


def protecting_gamma(alg: str, cfg, preserve: float | None) -> float:
  """The gamma `LoadedEditor.protecting` uses for an editor `alg` of config `cfg` (a config
  object or mapping) given `preserve` (None: the trained one). Raises ValueError unless the
  editor is least-squares MEND and the gamma a number > 0."""
  get = cfg.get if isinstance(cfg, Mapping) else lambda key, default=None: getattr(cfg, key, default)
  aggregation = get("aggregation") if alg == "mend" else None
  if aggregation != "least_squares":
    raise ValueError(f"protecting facts re-measures the preservation term of a MEND editor with "
                     f"aggregation='least_squares'; this one is {alg!r}"
                     + (f" with aggregation={aggregation!r}" if aggregation is not None else ""))
  gamma = get("preserve", 0.0) if preserve is None else preserve
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
    raise ValueError(f"preserve (the gamma of the term that keeps the protected facts) must be a number > 0"
                     + ("; this editor was trained without the term, so give one" if not get("preserve", 0.0) else "")
                     + f", got {preserve!r}")
  return float(gamma)


@dataclasses.dataclass(frozen=True)
class LoadedEditor:
  """A trained editor, ready to use: `new_params, info = loaded.edit(params, batch)` (jitted), or
  from strings, `new_params, info = loaded.edit_texts(params, prompts, targets)`.

  editor: the Editor (MEND, ENN, KE, FT, FT+KL); state: its EditorState; meta: the checkpoint's
  metadata; tokenizer: the model's tokenizer (for edit_texts and generate), if known. The edit
  starts from `editor.pre_edit_params(state, params)`: `params` itself, except for ENN, whose
  training changed the model (its trained copy is in the state)."""

  editor: Editor
  state: EditorState
  meta: dict
  tokenizer: Any = None

  def edit(self, params, batch: Mapping[str, Any], check: bool = True, **static):
    """The jitted edit from `params` (the base model), with the batch checked on the host first
    (`Editor.edit`). Returns (new_params, info)."""
    return editors.jit_edit(self.editor, from_base=True)(self.state, params, batch, check=check, **static)

  def _with_mend(self, key: str, n: int) -> "LoadedEditor":
    """A copy whose MEND config has `key` = n (an integer >= 0; 0 keeps the editor as it is)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"{key} must be an integer >= 0 (0: as trained), got {n!r}")
    if n == 0:
      return self
    if not hasattr(self.editor.cfg, key):
      raise ValueError(f"{key} applies to MEND editors; this one is {self.editor.name!r}")
    editor = editors.make(self.editor.name, self.editor.model, dataclasses.replace(self.editor.cfg, **{key: n}))
    return dataclasses.replace(self, editor=editor)

  def with_edit_steps(self, n: int) -> "LoadedEditor":
    """The same trained MEND editor applying itself n times per edit (`MENDConfig.edit_steps`);
    n = 0 keeps the number it was trained with."""
    return self._with_mend("edit_steps", n)

  def with_refine(self, n: int, loc_pool: Mapping[str, Any] | None = None) -> "LoadedEditor":
    """The same trained MEND editor followed by n steps of FT+KL on the edited matrices per edit
    (`MENDConfig.refine`), drawing locality examples from `loc_pool` (a batch dict; None: give one
    later with `with_loc_pool`); n = 0 keeps the editor's own setting."""
    out = self._with_mend("refine", n)
    return out.with_loc_pool(loc_pool) if loc_pool is not None else out

  def protecting(self, base_params, data, preserve: float | None = None) -> "LoadedEditor":
    """The same trained least-squares MEND editor keeping the facts of `data` (an EditData; its
    locality examples): the key-preservation term (`MENDConfig.preserve`) re-measured on them with
    `MEND.prepare` on `base_params`, with gamma `preserve` (None: the trained gamma). No
    retraining; works for an editor trained without the term when a gamma is given. The layers'
    capacity is shared: the facts the term is measured on are kept better, others less."""
    cfg = self.editor.cfg
    gamma = protecting_gamma(self.editor.name, cfg, preserve)
    if len(data) == 0:
      raise ValueError("the facts to protect are empty: expected at least one record")
    editor = editors.make(self.editor.name, self.editor.model, dataclasses.replace(cfg, preserve=gamma))
    return dataclasses.replace(self, editor=editor, state=editor.prepare(self.state, base_params, data,
                                                                         max_rows=len(data)))

  def _tok(self):
    if self.tokenizer is None:
      raise ValueError("this editor has no tokenizer: pass one, load_editor(path, model, tokenizer=...)")
    return self.tokenizer

  def edit_texts(self, params, prompts: list[str], targets: list[str], **static):
    """k edits at once from strings (a causal LM reads prompt + " " + target; the target's tokens
    are scored). The batch is padded to a multiple of 16 tokens, so similar lengths share one
    compiled edit. Returns (new_params, info)."""
    model = self.editor.model
    if model.task != "causal_lm":
      raise ValueError(f"edit_texts edits causal LMs; this model is a {model.task} model")
    if isinstance(prompts, str) or isinstance(targets, str):
      raise TypeError("prompts and targets are lists of strings (k edits at once)")
    tok = self._tok()
    need = max(len(models.bos_ids(tok) + tok.encode(f"{p} {t.strip()}", add_special_tokens=False))
               for p, t in zip(prompts, targets)) if prompts else 1
    max_len = -(-need // 16) * 16
    if model.max_length is not None:
      max_len = min(max_len, model.max_length)
    enc = batches.encode_pairs(tok, list(prompts), list(targets), max_len, what="edit_texts")
    return self.edit(params, enc.take(np.arange(len(prompts))), **static)

  def generate(self, params, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of `prompt` under `params` (before or after an edit)."""
    model = self.editor.model
    return models.greedy_answer(model, params, self._tok(), prompt, max_new_tokens=max_new_tokens,
                                max_len=min(model.max_length or 128, 128))

  def with_loc_pool(self, loc_pool: Mapping[str, Any]) -> "LoadedEditor":
    """A copy whose state carries a locality pool (FT+KL samples from it; others ignore it)."""
    return dataclasses.replace(self, state=self.editor.with_loc_pool(self.state, loc_pool))


def load_editor(path: str, model: EditableModel, params=None, tokenizer=None, mesh=None,
                shard_editor: bool = False) -> LoadedEditor:
  """Restores the editor saved in work directory `path` (its best checkpoint, else its latest)
  for `model` (whose parameters are `params`, default model.params), verifying its checksums.
  With a device `mesh` (`mend_jax.sharding`) the state is restored onto it, replicated or split
  over fsdp (shard_editor), whatever mesh it was saved from.
  The tokenizer (for edit_texts) defaults to the one beside the model's files, if any.
  Raises CheckpointMismatch if the checkpoint was made for another model family or other editable
  layers (and warns if for another base model), CheckpointError if it cannot be read,
  FileNotFoundError if there is none."""
  mngr, step = _checkpoint_step(path)
  where = os.path.join(path, "checkpoints")
  meta = _restore(mngr, step, where, meta=ocp.args.JsonRestore())["meta"]
  editor = editors.make(meta.get("alg", "mend"), model, meta["editor_config"])
  check_fingerprint(meta, editor, repr(path), params)
  abstract = jax.eval_shape(editor.init, jax.random.PRNGKey(0), model.params if params is None else params)
  if mesh is not None:
    abstract = sharding.place(abstract, sharding.state_shardings(abstract, mesh, shard_editor))
  state = EditorState(*_restore(mngr, step, where, editor=ocp.args.StandardRestore(_abstract(abstract)))["editor"])
  _verify(meta, "editor", state, where, step)
  mngr.close()
  if tokenizer is None and model.source and os.path.isfile(os.path.join(model.source, "tokenizer_config.json")):
    tokenizer = models.load_tokenizer(model.source)
  return LoadedEditor(editor, state, meta, tokenizer)


def _leaves(x) -> dict[str, Any]:
  return {tree.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(x)[0]}


def init_from_meta(path: str) -> dict:
  """`read_meta` of train.init_from's work directory, its errors naming the field."""
  try:
    return read_meta(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"train.init_from: {e}") from None


def check_init_from(path: str, editor: Editor, workdir: str | None = None, base_params=None) -> list[str]:
  """Before a run writes anything: `path` (train.init_from) must be a work directory, other than
  the run's own `workdir`, holding a checkpoint of the same kind of editor whose leaves have this
  editor's shapes wherever both have one, and some of whose trained parameters fit.

  Returns the paths of this editor's leaves the source lacks ("params/..." or "aux/...").
  Raises ValueError, FileNotFoundError or CheckpointMismatch naming train.init_from."""
  if workdir is not None and os.path.realpath(path) == os.path.realpath(workdir):
    raise ValueError(f"train.init_from {path!r} is this run's own --workdir; expected another run's work directory "
                     "(a run resumes from its own work directory by itself)")
  meta = init_from_meta(path)
  if meta.get("alg", "mend") != editor.name:
    raise CheckpointMismatch(f"train.init_from {path!r} holds a {meta.get('alg')!r} editor; this run trains "
                             f"{editor.name!r}: expected a work directory of the same editor")
  want_fp = fingerprint(editor, base_params)
  for key in ("family", "layers"):
    if meta.get(key) != want_fp[key]:
      raise CheckpointMismatch(f"train.init_from {path!r} holds an editor whose {key} is {meta.get(key)!r}, but this "
                               f"run's is {want_fp[key]!r}: expected an editor of the same model family and layers")
  source = editors.make(editor.name, editor.model, meta["editor_config"])
  params = editor.model.params if base_params is None else base_params
  rng = jax.random.PRNGKey(0)
  want, have = jax.eval_shape(editor.init, rng, params), jax.eval_shape(source.init, rng, params)
  fresh, size = [], {True: 0, False: 0}  # trained parameters taken / left fresh, in elements
  for part in ("params", "aux"):
    theirs = _leaves(getattr(have, part))
    for key, leaf in _leaves(getattr(want, part)).items():
      if key not in theirs:
        fresh.append(f"{part}/{key}")
      elif tuple(theirs[key].shape) != tuple(leaf.shape):
        raise CheckpointMismatch(f"train.init_from {path!r}: its {part} leaf {key!r} has shape "
                                 f"{tuple(theirs[key].shape)}, this editor's {tuple(leaf.shape)} (expected an editor "
                                 "of the same widths and rank)")
      if part == "params":
        size[key in theirs] += math.prod(leaf.shape)
  if size[True] <= size[False]:  # e.g. networks of another layout (MEND's `shared`): little would be taken
    raise CheckpointMismatch(f"train.init_from {path!r}: only {size[True]:,} of this editor's {sum(size.values()):,} "
                             "trained parameters have a counterpart there (expected most of them; paths left fresh: "
                             f"{', '.join(p for p in fresh if p.startswith('params/'))})")
  return fresh


def warm_start(editor: Editor, state: EditorState, path: str, base_params=None, mesh=None,
               shard_editor: bool = False) -> tuple[EditorState, list[str]]:
  """`state` (a fresh state of `editor`) with every leaf that the editor saved in work directory
  `path` (its best checkpoint, else its latest) also holds, at the same path and shape, taken from
  there: its trained parameters and carried statistics. The source may differ in its editor
  config (MEND: edit_steps, aggregation, preserve, ...); leaves it lacks (MEND: a summed editor's
  missing log_lambda) keep their fresh values, its leaves this state lacks are dropped. Values
  keep the fresh leaves' dtypes and placement (a mesh's, when `state` is on one).

  Returns (state, the paths of the leaves left fresh, "params/..." or "aux/...").
  Raises as `check_init_from`."""
  fresh = check_init_from(path, editor, base_params=base_params)
  source = load_editor(path, editor.model, base_params, mesh=mesh, shard_editor=shard_editor).state
  out = {}
  for part in ("params", "aux"):
    have = _leaves(getattr(source, part))
    flat, treedef = jax.tree_util.tree_flatten_with_path(getattr(state, part))
    new = [leaf if (key := tree.path_str(p)) not in have
           else jax.device_put(jnp.asarray(have[key], leaf.dtype), leaf.sharding) for p, leaf in flat]
    out[part] = jax.tree_util.tree_unflatten(treedef, new)
  return EditorState(out["params"], out["aux"]), fresh


def save_untrained(editor: Editor, base_params, workdir: str, seed: int, meta: Mapping) -> dict:
  """For editors with nothing to train (FT, FT+KL): saves their initial state as the work
  directory's checkpoint (step 0), so evaluation, scripts and `load_editor` treat every editor
  alike. Returns a training summary with zero steps."""
  run = {**dict(meta), **fingerprint(editor, base_params)}
  check_workdir(workdir, run)
  state = jax.jit(editor.init)(jax.random.PRNGKey(seed), base_params)
  mngr = Checkpoints(workdir, run)
  mngr.save(0, state, {"step": jnp.zeros((), jnp.int32)})
  mngr.close()
  return {"steps": 0, "best_val_loss": None, "stopped_early": False, "n_skipped": 0, "train_time_s": 0.0}
