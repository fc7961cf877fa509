"""Training a learned editor (MEND, ENN, KE): Algorithm 1's loop, jitted step, validation, checkpoints.

Per step: edit with (x_e, y_e); L_e = token-mean NLL of the edited model on the paraphrase
(x'_e, y_e); L_loc = KL(p_base || p_edited) on a locality batch; L = c_edit L_e + c_loc L_loc
(the algorithm's `loss`, see `mend_jax.algs`; ENN adds its base-model term). Adam on the editor's
"net" leaves (lr) and, separately, on its "alpha" leaves (lr_lr: MEND's per-layer steps, ENN's
inner learning rates), global-norm clipping, gradient accumulation (optax.MultiSteps). A
micro-step whose loss or gradient is not finite changes nothing (params, optimizer state, aux)
and is counted in `n_skipped`. Nothing here is specific to one algorithm.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mend_jax import checkpoint as ckpt_lib
from mend_jax.algs import Objective
from mend_jax.data import EditData


class TrainState(NamedTuple):
  """Everything a resumed run needs. params: the editor's trained pytree (MEND: {"net", "alpha"});
  aux: what it carries untrained (MEND: normalisation statistics)."""

  step: jax.Array
  params: Any
  opt_state: Any
  aux: Any
  rng: jax.Array
  n_skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  lr: float = 1e-4  # editor networks (official: 1e-6 on large models)
  lr_lr: float = 1e-4  # the "alpha" leaves: MEND's per-layer edit steps, ENN's inner lrs
  c_edit: float = 0.1
  c_loc: float = 1.0
  accumulate: int = 10
  grad_clip: float = 100.0
  max_steps: int = 1000
  n_edits: int = 1  # edits per micro-batch
  n_loc: int = 4  # locality examples per micro-batch
  val_every: int = 200
  n_val: int = 100
  patience: int = 5  # validations without improvement before stopping
  log_every: int = 20
  ckpt_every: int = 200
  kl_positions: str = "answer"  # "answer": positions predicting loc_ans; "all": every non-pad token

  @property
  def objective(self) -> Objective:
    return Objective(self.c_edit, self.c_loc, self.kl_positions)


def _default_labels(params):
  return {"net": jax.tree_util.tree_map(lambda _: "net", params["net"]), "alpha": "alpha"}


def make_optimizer(cfg: TrainConfig, editor=None) -> optax.GradientTransformation:
  """Adam (lr) for the editor's "net" leaves, its own Adam (lr_lr) for the "alpha" leaves
  (`editor.param_labels`), clipping, then accumulation."""
  labels = editor.param_labels if editor is not None else _default_labels
  inner = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.multi_transform({"net": optax.adam(cfg.lr), "alpha": optax.adam(cfg.lr_lr)}, labels),
  )
  return optax.MultiSteps(inner, every_k_schedule=cfg.accumulate) if cfg.accumulate > 1 else inner


def init_state(editor, tx: optax.GradientTransformation, seed: int, base_params=None) -> TrainState:
  """The initial state, built under jit (no eager temporaries: the editor of the 6x768 benchmark
  has 59M parameters, plus two Adam moments)."""
  rng = jax.random.PRNGKey(seed)

  @jax.jit
  def build(rng, base_params):
    st = editor.init(jax.random.fold_in(rng, 0), base_params)
    return TrainState(jnp.zeros((), jnp.int32), st.params, tx.init(st.params), st.aux,
                      jax.random.fold_in(rng, 1), jnp.zeros((), jnp.int32))

  return build(rng, base_params)


def edit_loss(editor, cfg: TrainConfig, train_params, aux, base_params, batch, update_stats: bool = True):
  """The editor's loss and metrics for one micro-batch {"edit", "equiv", "loc"}: (loss, (new_aux,
  metrics)). update_stats=False (validation) keeps carried statistics frozen."""
  return editor.loss(train_params, aux, base_params, batch, cfg.objective, train=update_stats)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@functools.lru_cache(maxsize=32)
def make_train_step(editor, cfg: TrainConfig, fault: Callable | None = None):
  """One jitted micro-step (state, base_params, batch) -> (state, metrics), donating the state.
  Cached per (editor, config), so repeated `fit` calls in one process compile once.

  `fault(loss, step)` lets a test inject a non-finite loss."""
  tx = make_optimizer(cfg, editor)

  def step_fn(state: TrainState, base_params, batch):
    def loss_fn(p):
      loss, aux = edit_loss(editor, cfg, p, state.aux, base_params, batch)
      if fault is not None:
        loss = fault(loss, state.step)
      return loss, aux

    (loss, (new_aux, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_aux)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "skipped": (~ok).astype(jnp.float32)}
    return TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        aux=keep(new_aux, state.aux),
        rng=state.rng,
        n_skipped=state.n_skipped + (~ok).astype(jnp.int32),
    ), metrics

  return jax.jit(step_fn, donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def make_eval_step(editor, cfg: TrainConfig):
  """Jitted validation loss/metrics of a batch with frozen statistics."""

  def eval_fn(params, aux, base_params, batch):
    _, (_, metrics) = edit_loss(editor, cfg, params, aux, base_params, batch, update_stats=False)
    return metrics

  return jax.jit(eval_fn)


def validate(eval_step, state: TrainState, base_params, data: EditData, cfg: TrainConfig) -> dict:
  """Mean metrics over the first n_val records, one edit at a time (fixed subset, fixed shapes)."""
  n = min(cfg.n_val, len(data))
  out: dict[str, list] = {}
  for i in range(n):
    loc_idx = np.arange(i, i + cfg.n_loc) % len(data)
    m = eval_step(state.params, state.aux, base_params, data.batch(np.array([i]), loc_idx))
    for k, v in m.items():
      out.setdefault(k, []).append(float(v))
  return {f"val/{k}": float(np.mean(v)) for k, v in out.items()}


def fit(editor, cfg: TrainConfig, base_params, train: EditData, val: EditData, workdir: str,
        seed: int = 0, meta: Mapping | None = None, fault: Callable | None = None,
        progress: bool = True) -> tuple[TrainState, dict]:
  """The training loop. Resumes from workdir/checkpoints if present; keeps workdir/best.

  Writes workdir/metrics.jsonl (one JSON object per logged step or validation). Returns the final
  state and a summary dict. Stops at max_steps or after `patience` validations without improvement.
  """
  from tqdm.auto import tqdm

  os.makedirs(workdir, exist_ok=True)
  tx = make_optimizer(cfg, editor)
  meta = dict(meta or {})
  meta.update(ckpt_lib.model_fingerprint(editor))
  mngr = ckpt_lib.Checkpoints(workdir, meta)
  state = init_state(editor, tx, seed, base_params)
  state, extra = mngr.restore_latest(state)
  best_val = extra.get("best_val", float("inf"))
  bad_vals = extra.get("bad_vals", 0)
  start = int(state.step)
  train_step = make_train_step(editor, cfg, fault)
  eval_step = make_eval_step(editor, cfg)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  acc: dict[str, list] = {}
  bar = tqdm(total=cfg.max_steps, initial=start, disable=not progress, desc=f"train {editor.name}", dynamic_ncols=True)
  stopped_early = False
  step = start
  with open(metrics_path, "a") as log:
    while step < cfg.max_steps:
      batch = train.sample(seed, step, cfg.n_edits, cfg.n_loc)
      state, m = train_step(state, base_params, batch)
      step += 1
      for k, v in m.items():
        acc.setdefault(k, []).append(v)
      if step % cfg.log_every == 0 or step == cfg.max_steps:
        row = {k: float(np.mean(jax.device_get(v))) for k, v in acc.items()}
        acc = {}
        row.update(step=step, time_s=round(time.time() - t0, 2), n_skipped=int(state.n_skipped))
        log.write(json.dumps(row) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{row['loss']:.3f}", es=f"{row['edit_success']:.2f}", loc=f"{row['loc_agree']:.3f}")
      if step % cfg.val_every == 0 or step == cfg.max_steps:
        vm = validate(eval_step, state, base_params, val, cfg)
        improved = vm["val/loss"] < best_val
        if improved:
          best_val, bad_vals = vm["val/loss"], 0
          mngr.save_best(step, state)
        else:
          bad_vals += 1
        log.write(json.dumps({"step": step, **vm, "best_val_loss": best_val}) + "\n")
        log.flush()
        bar.write(f"step {step}: val loss {vm['val/loss']:.4f} edit success {vm['val/edit_success']:.3f} "
                  f"loc agree {vm['val/loc_agree']:.3f}{' (best)' if improved else ''}")
        mngr.save_latest(step, state, {"best_val": best_val, "bad_vals": bad_vals})
        if bad_vals >= cfg.patience and step < cfg.max_steps:
          stopped_early = True
          break
      elif step % cfg.ckpt_every == 0:
        mngr.save_latest(step, state, {"best_val": best_val, "bad_vals": bad_vals})
      bar.update(1)
  bar.close()
  mngr.save_latest(step, state, {"best_val": best_val, "bad_vals": bad_vals})
  mngr.close()
  return state, {"steps": step, "best_val_loss": best_val, "stopped_early": stopped_early,
                 "n_skipped": int(state.n_skipped), "train_time_s": time.time() - t0}
