"""Training a learned editor (MEND, ENN, KE): Algorithm 1's loop, one jitted step, validation.

Per micro-step: edit with (x_e, y_e); L_e = token-mean NLL of the edited model on the paraphrase
(x'_e, y_e); L_loc = KL(p_base || p_edited) on a locality batch; L = c_edit L_e + c_loc L_loc
(the editor's `loss`, `mend_jax.editors.base`; ENN adds its base-model term). Adam on the
editor's "net" leaves (lr) and, separately, on its "alpha" leaves (lr_lr: MEND's per-layer steps,
ENN's inner learning rates), global-norm clipping, gradient accumulation (`mend_jax.optim`). A
micro-step whose loss, gradient or carried state is not finite changes nothing (params,
optimizer state, aux) and is counted in `n_skipped`. Nothing here is specific to one editor.

`fit` validates every `val_every` micro-steps on a fixed subset, keeps the best checkpoint by
validation loss next to the latest one (`mend_jax.checkpoint`), stops early after `patience`
validations without improvement, and resumes from the work directory by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mend_jax import checkpoint as ckpt_lib
from mend_jax import losses, optim, report, sharding, tree
from mend_jax.data.batches import EditData
from mend_jax.editors.base import Editor, EditorState


class TrainState(NamedTuple):
  """Everything a resumed run needs: step [] int32 (micro-steps done), editor (the EditorState:
  trained params and carried aux), opt_state (Adam moments and accumulation), n_skipped [] int32
  (micro-steps skipped as non-finite)."""

  step: jax.Array
  editor: EditorState
  opt_state: Any
  n_skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training hyperparameters (names as the official config where they exist).

  lr: Adam step of the editor's networks (official: 1e-6 on large models). lr_lr: Adam step of the
  "alpha" leaves. schedule, warmup: both lrs warm up linearly over `warmup` Adam updates, then stay
  ("constant") or decay along a cosine to 10% at the last update ("cosine"). c_edit, c_loc, kl_positions: the objective (`losses.Objective`). accumulate:
  micro-batches per Adam update. grad_clip: global-norm clip. max_steps: micro-steps. n_edits,
  n_loc: edits and locality examples per micro-batch. val_every, n_val: validation period and
  size. patience: validations without improvement before stopping. log_every, ckpt_every: micro-
  steps between metric rows and between checkpoints.
  """

  lr: float = 1e-4
  lr_lr: float = 1e-4
  schedule: str = "constant"  # of both lrs over the Adam updates: "constant" or "cosine" (to 10%, after warmup)
  warmup: int = 0  # Adam updates of linear warm-up from 0
  c_edit: float = 0.1
  c_loc: float = 1.0
  accumulate: int = 10
  grad_clip: float = 100.0
  max_steps: int = 1000
  n_edits: int = 1
  n_loc: int = 4
  val_every: int = 200
  n_val: int = 100
  patience: int = 5
  log_every: int = 20
  ckpt_every: int = 200
  kl_positions: str = "answer"  # "answer": positions predicting loc_ans; "all": every non-pad token
  # MEND's key-preservation term: this share of the training split's locality subjects (records, when they
  # name none) is measured by the term only and never read by the locality KL, so training meets locality
  # facts the term was not measured on, as held-out evaluation does. 0: every example serves both.
  preserve_share: float = 0.0
  # A work directory of the same editor whose trained parameters and statistics (best checkpoint, else latest)
  # start this run, where their paths and shapes fit (`checkpoint.warm_start`); its editor config may differ (MEND:
  # edit_steps, aggregation, preserve). The optimizer, step count and schedule start fresh. "": initialise.
  init_from: str = ""

  def __post_init__(self):
    losses.check_kl_positions(self.kl_positions)
    for name in ("lr", "lr_lr", "grad_clip"):
      if not getattr(self, name) > 0:
        raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
    for name in ("accumulate", "max_steps", "n_edits", "n_loc", "val_every", "n_val", "patience", "log_every",
                 "ckpt_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be an integer >= 1, got {value!r}")
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
      raise ValueError(f"train.warmup must be an integer >= 0, got {self.warmup!r}")
    if isinstance(self.preserve_share, bool) or not isinstance(self.preserve_share, (int, float)) \
        or not 0 <= self.preserve_share < 1:
      raise ValueError(f"train.preserve_share must be a number in [0, 1), got {self.preserve_share!r}")
    if not isinstance(self.init_from, str):
      raise ValueError(f"train.init_from must be a work directory path (or '' for none), got {self.init_from!r}")
    if self.c_edit < 0 or self.c_loc < 0:
      raise ValueError(f"train.c_edit and train.c_loc must be >= 0, got {self.c_edit} and {self.c_loc}")

  @property
  def objective(self) -> losses.Objective:
    """The loss weights of Algorithm 1 this config trains with."""
    return losses.Objective(self.c_edit, self.c_loc, self.kl_positions)


def _lr(cfg: TrainConfig, peak: float):
  """The learning rate of `peak` under cfg.schedule/warmup, over the run's Adam updates."""
  if cfg.schedule == "constant" and cfg.warmup == 0:
    return peak
  updates = max(1, cfg.max_steps // cfg.accumulate)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup), optax.constant_schedule(peak)],
                                [cfg.warmup])
  return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup, max(updates, cfg.warmup + 1), peak * 0.1)


def make_optimizer(cfg: TrainConfig, editor: Editor) -> optim.ClippedAdam:
  """Global-norm clipping, then Adam (lr) for the editor's "net" leaves and Adam (lr_lr) for its
  "alpha" leaves (`editor.param_labels`), applied every cfg.accumulate micro-steps to their mean
  gradient: optax's clip_by_global_norm, multi_transform of two adams and MultiSteps, fused into
  one pass over each parameter (`mend_jax.optim`)."""
  return optim.ClippedAdam({"net": _lr(cfg, cfg.lr), "alpha": _lr(cfg, cfg.lr_lr)}, editor.param_labels,
                           cfg.grad_clip, cfg.accumulate)


def _initial_state(editor: Editor, tx: optim.ClippedAdam, rng: jax.Array, base_params) -> TrainState:
  st = editor.init(jax.random.fold_in(rng, 0), base_params)
  return TrainState(jnp.zeros((), jnp.int32), st, tx.init(st.params), jnp.zeros((), jnp.int32))


def init_state(editor: Editor, tx: optim.ClippedAdam, seed: int, base_params=None,
               mesh=None, shard_editor: bool = False) -> TrainState:
  """The initial state, built under jit (no eager temporaries: the editor of the 6x768 benchmark
  has 59M parameters, plus two Adam moments); on `mesh`, placed by `sharding.state_shardings`."""
  init = functools.partial(_initial_state, editor, tx)
  out = None
  if mesh is not None:
    out = sharding.state_shardings(state_shapes(editor, tx, seed, base_params), mesh, shard_editor)
  return jax.jit(init, out_shardings=out)(jax.random.PRNGKey(seed), base_params)


def state_shapes(editor: Editor, tx: optim.ClippedAdam, seed: int, base_params=None) -> TrainState:
  """The abstract TrainState (jax.ShapeDtypeStruct leaves) `init_state` would build; no arrays."""
  return jax.eval_shape(functools.partial(_initial_state, editor, tx), jax.random.PRNGKey(seed), base_params)


def _split(state: TrainState) -> tuple[EditorState, dict]:
  """(editor state, the rest) as the checkpoint stores them."""
  return state.editor, {"step": state.step, "opt_state": state.opt_state, "n_skipped": state.n_skipped}


def _join(editor_state: EditorState, rest: Mapping) -> TrainState:
  return TrainState(rest["step"], editor_state, rest["opt_state"], rest["n_skipped"])


@functools.lru_cache(maxsize=32)
def make_train_step(editor: Editor, cfg: TrainConfig, fault: Callable | None = None, mesh=None,
                    shard_editor: bool = False):
  """One jitted micro-step (state, base_params, batch) -> (state, metrics), donating the state.
  Cached per (editor, config, mesh), so repeated `fit` calls in one process compile once.

  On `mesh`, the base parameters and the batch come sharded (`mend_jax.sharding`) and the new
  state keeps the state's placement (replicated, or split with shard_editor); metrics are
  replicated. `fault(loss, step)` lets a test inject a non-finite loss."""
  tx = make_optimizer(cfg, editor)
  objective = cfg.objective

  def step_fn(state: TrainState, base_params, batch):
    def loss_fn(p):
      loss, aux = editor.loss(p, state.editor.aux, base_params, batch, objective, train=True)
      if fault is not None:
        loss = fault(loss, state.step)
      return loss, aux

    (loss, (new_aux, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.editor.params)
    grad_norm = optax.global_norm(grads)  # not finite if any gradient is not (or their norm overflows)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree.all_finite(new_aux)

    # A branch rather than a jnp.where between the old and new state: XLA then updates the donated
    # parameters and Adam moments in place instead of copying both moments first (docs/scale.md).
    new_params, new_opt = jax.lax.cond(ok, functools.partial(tx.apply, grads, grad_norm=grad_norm),
                                       lambda o, p: (p, o), state.opt_state, state.editor.params)
    kept_aux = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_aux, state.editor.aux)
    metrics = {**metrics, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}
    new_state = TrainState(
        step=state.step + 1,
        editor=EditorState(new_params, kept_aux),
        opt_state=new_opt,
        n_skipped=state.n_skipped + (~ok).astype(jnp.int32),
    )
    if mesh is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, sharding.state_shardings(new_state, mesh, shard_editor))
      metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(mesh))
    return new_state, metrics

  return jax.jit(step_fn, donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def make_eval_step(editor: Editor, cfg: TrainConfig):
  """Jitted (editor_state, base_params, batch) -> validation metrics, statistics frozen."""
  objective = cfg.objective

  def eval_fn(editor_state: EditorState, base_params, batch):
    _, (_, metrics) = editor.loss(editor_state.params, editor_state.aux, base_params, batch, objective, train=False)
    return metrics

  return jax.jit(eval_fn)


def _on(mesh, batch):
  return batch if mesh is None else sharding.shard_batch(batch, mesh)


def validate(eval_step, editor_state: EditorState, base_params, data: EditData, cfg: TrainConfig,
             mesh=None) -> dict:
  """Mean metrics over the first n_val records, cfg.n_edits at a time as in training (a fixed
  subset and fixed shapes; n_val rounded down to a multiple of n_edits, at least one batch; a
  split smaller than n_edits is one batch of all its records), each batch with the n_loc
  locality rows that follow it (on `mesh`: split over its data axis where they divide). Keys
  are prefixed "val/"."""
  k = min(cfg.n_edits, len(data))
  n = max(k, min(cfg.n_val, len(data)) // k * k)
  out: dict[str, list] = {}
  for i in range(0, n, k):
    if i == (n // k) // 2 * k:
      ckpt_lib.crash_point("validate")
    loc_idx = np.arange(i, i + cfg.n_loc) % len(data)
    m = eval_step(editor_state, base_params, _on(mesh, data.batch(np.arange(i, i + k), loc_idx)))
    for key, v in m.items():
      out.setdefault(key, []).append(float(v))
  return {f"val/{key}": float(np.mean(v)) for key, v in out.items()}


class TrainingFailed(ValueError):
  """A run whose training went bad: most micro-steps non-finite, or no finite validation loss."""


def fit(editor: Editor, cfg: TrainConfig, base_params, train: EditData, val: EditData, workdir: str,
        seed: int = 0, meta: Mapping | None = None, fault: Callable | None = None,
        progress: Callable[[int, int, Mapping[str, float]], None] | None = None, mesh=None,
        shard_editor: bool = False) -> tuple[TrainState, dict]:
  """The training loop (module docstring). Resumes from workdir's latest checkpoint if there is one.

  Args:
    editor: a learned editor.
    base_params: the frozen model (never changed).
    train, val: training and validation records (val: the first cfg.n_val are used).
    workdir: checkpoints and workdir/metrics.jsonl (one JSON object per logged step or validation).
    seed: the data order and the editor's initialisation; batch s depends only on (seed, s).
    meta: JSON-able metadata stored with every checkpoint (the experiment config).
    progress: called after every micro-step with (step, max_steps, the last logged metric row).
    mesh: a (data, fsdp) Mesh (`mend_jax.sharding`): base_params should be placed on it
      (`sharding.shard_params`); batches are split over its data axis; the state is replicated,
      or split over fsdp with shard_editor. A checkpoint restores onto any mesh (or none).
  Returns:
    (final state, summary {steps, best_val_loss, stopped_early, n_skipped, train_time_s}).
  Raises:
    CheckpointMismatch: workdir holds a checkpoint of another run, or cfg.init_from an editor that does
      not fit (nothing is written).
    FileNotFoundError, ValueError: cfg.init_from holds no checkpoint, or is workdir itself (nothing is
      written); CheckpointError: its checkpoint cannot be read.
    TrainingFailed: more than half of all micro-steps were skipped as non-finite, or no
      validation loss was finite (the checkpoints stay for inspection; none becomes best).
  """
  if not editor.learned:
    raise ValueError(f"editor {editor.name!r} has nothing to train; save it with checkpoint.save_untrained")
  if not editor.frozen_prefix and (train.edit.hidden is not None or val.edit.hidden is not None):
    raise ValueError(f"editor {editor.name!r} changes the blocks below the edited layers; train it without cached "
                     "activations")
  term_rows = loc_pool = None
  if cfg.preserve_share:
    if not getattr(getattr(editor, "cfg", None), "preserve", 0):
      raise ValueError(f"train.preserve_share sets locality examples aside for MEND's preservation term, but editor "
                       f"{editor.name!r} has none (--config.mend.preserve=GAMMA with aggregation='least_squares')")
    term_rows, loc_pool = train.locality_split(cfg.preserve_share, seed)
  run = {**dict(meta or {}), **ckpt_lib.fingerprint(editor, base_params)}
  ckpt_lib.check_workdir(workdir, run)  # refuse a directory of another run before writing anything
  if cfg.init_from and not ckpt_lib.has_checkpoint(workdir):  # a resumed run starts from its own checkpoint
    ckpt_lib.check_init_from(cfg.init_from, editor, workdir, base_params)
  os.makedirs(workdir, exist_ok=True)
  tx = make_optimizer(cfg, editor)
  mngr = ckpt_lib.Checkpoints(workdir, run)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if mngr.latest_step() is None:
    state, extra = init_state(editor, tx, seed, base_params, mesh, shard_editor), {}
    if cfg.init_from:
      warm, fresh = ckpt_lib.warm_start(editor, state.editor, cfg.init_from, base_params, mesh, shard_editor)
      state = state._replace(editor=warm)
      fresh = [p for p in fresh if p.startswith("params/")]  # fresh statistics are measured or updated as training runs
      logging.info("started from the editor in %s%s", cfg.init_from,
                   f"; parameters left at their initial values: {', '.join(fresh)}" if fresh else "")
    # Statistics of the frozen model the editor measures once (MEND's key-preservation term).
    measured = train
    if term_rows is not None:  # without cached activations: a subset of memory-mapped ones would load into memory
      measured = train.without_cached_activations().subset(term_rows)
    state = state._replace(editor=editor.prepare(state.editor, base_params, measured))
    if os.path.exists(metrics_path):
      os.remove(metrics_path)  # rows of a run that never reached a checkpoint
  else:  # shapes first, restored into: the state is allocated once
    shapes = state_shapes(editor, tx, seed, base_params)
    if mesh is not None:
      shapes = sharding.place(shapes, sharding.state_shardings(shapes, mesh, shard_editor))
    editor_state, rest, extra = mngr.restore(*_split(shapes))
    state = _join(editor_state, rest)
    # Rows logged after this checkpoint are logged again by this run.
    report.filter_jsonl(metrics_path, lambda row: row.get("step", 0) <= int(state.step))
    logging.info("resuming %s from step %d of %s", editor.name, int(state.step), workdir)
  best_val = extra.get("best_val")
  best_val = float("inf") if best_val is None else float(best_val)
  bad_vals = extra.get("bad_vals", 0)
  train_step = make_train_step(editor, cfg, fault, mesh, shard_editor)
  eval_step = make_eval_step(editor, cfg)
  t0 = time.time()
  acc: dict[str, list] = {}
  row: dict[str, float] = {}
  stopped_early = False
  step = first = int(state.step)
  bookkeeping = lambda: {"best_val": best_val, "bad_vals": bad_vals}
  with open(metrics_path, "a") as log:
    while step < cfg.max_steps:
      batch = train.sample(seed, step, cfg.n_edits, cfg.n_loc, loc_pool)
      ckpt_lib.crash_point("compile" if step == first else "step", step)
      state, m = train_step(state, base_params, _on(mesh, batch))
      step += 1
      for k, v in m.items():
        acc.setdefault(k, []).append(v)
      if step % cfg.log_every == 0 or step == cfg.max_steps:
        row = {k: float(np.mean(jax.device_get(v))) for k, v in acc.items()}
        acc = {}
        row.update(step=step, time_s=round(time.time() - t0, 2), n_skipped=int(state.n_skipped))
        log.write(report.dumps(row) + "\n")
        log.flush()
      if step % cfg.val_every == 0 or step == cfg.max_steps:
        vm = validate(eval_step, state.editor, base_params, val, cfg, mesh)
        improved = bool(vm["val/loss"] < best_val)  # a NaN loss never improves
        if improved:
          best_val, bad_vals = vm["val/loss"], 0
        else:
          bad_vals += 1
        log.write(report.dumps({"step": step, **vm, "best_val_loss": best_val}) + "\n")
        log.flush()
        logging.info("step %d: val loss %.4f, edit success %.3f, loc agree %.3f%s", step, vm["val/loss"],
                     vm["val/edit_success"], vm["val/loc_agree"], " (best)" if improved else "")
        mngr.save(step, *_split(state), bookkeeping(), val_loss=vm["val/loss"])
        ckpt_lib.crash_point("after_val_save", step)
        if bad_vals >= cfg.patience and step < cfg.max_steps:
          stopped_early = True
          logging.info("stopping early: %d validations without improvement", bad_vals)
          break
      elif step % cfg.ckpt_every == 0:
        mngr.save(step, *_split(state), bookkeeping())
      if progress is not None:
        progress(step, cfg.max_steps, row)
  mngr.save(step, *_split(state), bookkeeping())
  mngr.close()
  n_skipped = int(state.n_skipped)
  if 2 * n_skipped > int(state.step):
    raise TrainingFailed(f"{n_skipped} of {int(state.step)} micro-steps were skipped because their loss or gradient "
                         f"was not finite; the editor in {workdir!r} is not usable (lower train.lr, check the data)")
  if not np.isfinite(best_val):
    raise TrainingFailed(f"no validation loss was finite in {step} micro-steps; the editor in {workdir!r} is not "
                         "usable (lower train.lr, check the data)")
  return state, {"steps": step, "best_val_loss": best_val, "stopped_early": stopped_early,
                 "n_skipped": n_skipped, "train_time_s": time.time() - t0}
