"""Training MEND (Algorithm 1 of the paper): loss, jitted step, validation, checkpoints, loop.

Per step: edit with (x_e, y_e); L_e = token-mean NLL of the edited model on the paraphrase
(x'_e, y_e); L_loc = KL(p_base || p_edited) on a locality batch; L = c_edit L_e + c_loc L_loc.
Adam on the editor networks (lr) and, separately, on the per-layer steps alpha (lr_lr), global-norm
clipping, gradient accumulation (optax.MultiSteps). A micro-step whose loss or gradient is not
finite changes nothing (params, optimizer state, statistics) and is counted in `n_skipped`.
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
from mend_jax import losses
from mend_jax.data import EditData
from mend_jax.mend import MEND


class TrainState(NamedTuple):
  """Everything a resumed run needs; `params` = editor params {"net", "alpha"}."""

  step: jax.Array
  params: dict
  opt_state: Any
  stats: dict
  rng: jax.Array
  n_skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  lr: float = 1e-4  # editor networks (official: 1e-6 on large models)
  lr_lr: float = 1e-4  # the per-layer edit steps alpha
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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam for the networks, its own Adam (lr_lr) for alpha, clipping, then accumulation."""
  labels = lambda params: {"net": jax.tree_util.tree_map(lambda _: "net", params["net"]), "alpha": "alpha"}
  inner = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.multi_transform({"net": optax.adam(cfg.lr), "alpha": optax.adam(cfg.lr_lr)}, labels),
  )
  return optax.MultiSteps(inner, every_k_schedule=cfg.accumulate) if cfg.accumulate > 1 else inner


def init_state(editor: MEND, tx: optax.GradientTransformation, seed: int) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  st = editor.init(jax.random.fold_in(rng, 0))
  return TrainState(jnp.zeros((), jnp.int32), st.params, tx.init(st.params), st.stats,
                    jax.random.fold_in(rng, 1), jnp.zeros((), jnp.int32))


def _prep_loc(batch, kl_positions):
  if kl_positions == "all":  # KL at every non-pad token: the answer-only mask and positions go
    return {k: v for k, v in batch.items() if k not in ("kl_mask", "read_pos", "read_mask")}
  return batch


def edit_loss(editor: MEND, cfg: TrainConfig, editor_params, stats, base_params, batch,
              update_stats: bool = True):
  """Loss and metrics for one micro-batch {"edit", "equiv", "loc"}. Returns
  (loss, (new_stats, metrics)). Training absorbs the edit batch into the normalisation statistics
  before editing (as the official code); validation (update_stats=False) keeps them frozen."""
  model = editor.model
  if update_stats:
    new_params, new_stats, info = editor.edit_for_training(editor_params, stats, base_params, batch["edit"])
  else:
    cap = editor.capture(base_params, batch["edit"])
    new_params, info = editor.apply_updates(editor_params, stats, base_params, cap)
    new_stats = stats
  eq_logits = model.logits(new_params, batch["equiv"])
  l_edit = losses.nll(model.task, eq_logits, batch["equiv"])
  loc = _prep_loc(batch["loc"], cfg.kl_positions)
  base_loc_logits = jax.lax.stop_gradient(model.logits(base_params, loc))
  post_loc_logits = model.logits(new_params, loc)
  l_loc = losses.locality_kl(model.task, base_loc_logits, post_loc_logits, loc)
  loss = cfg.c_edit * l_edit + cfg.c_loc * l_loc
  metrics = {
      "loss": loss, "loss_edit": l_edit, "loss_loc": l_loc, "loss_before": info["loss_before"],
      "edit_success": jnp.mean(losses.exact_match(model.task, eq_logits, batch["equiv"])),
      "loc_agree": jnp.mean(losses.exact_match(model.task, post_loc_logits, batch["loc"])
                            == losses.exact_match(model.task, base_loc_logits, batch["loc"])),
      "update_norm": jnp.mean(info["update_norm"]),
  }
  return loss, (new_stats, metrics)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@functools.lru_cache(maxsize=32)
def make_train_step(editor: MEND, cfg: TrainConfig, fault: Callable | None = None):
  """One jitted micro-step (state, base_params, batch) -> (state, metrics), donating the state.
  Cached per (editor, config), so repeated `fit` calls in one process compile once.

  `fault(loss, step)` lets a test inject a non-finite loss."""
  tx = make_optimizer(cfg)

  def step_fn(state: TrainState, base_params, batch):
    def loss_fn(p):
      loss, aux = edit_loss(editor, cfg, p, state.stats, base_params, batch)
      if fault is not None:
        loss = fault(loss, state.step)
      return loss, aux

    (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_stats)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "skipped": (~ok).astype(jnp.float32)}
    return TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        stats=keep(new_stats, state.stats),
        rng=state.rng,
        n_skipped=state.n_skipped + (~ok).astype(jnp.int32),
    ), metrics

  return jax.jit(step_fn, donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def make_eval_step(editor: MEND, cfg: TrainConfig):
  """Jitted validation loss/metrics of a batch with frozen statistics."""

  def eval_fn(params, stats, base_params, batch):
    _, (_, metrics) = edit_loss(editor, cfg, params, stats, base_params, batch, update_stats=False)
    return metrics

  return jax.jit(eval_fn)


def validate(eval_step, state: TrainState, base_params, data: EditData, cfg: TrainConfig) -> dict:
  """Mean metrics over the first n_val records, one edit at a time (fixed subset, fixed shapes)."""
  n = min(cfg.n_val, len(data))
  out: dict[str, list] = {}
  for i in range(n):
    loc_idx = np.arange(i, i + cfg.n_loc) % len(data)
    m = eval_step(state.params, state.stats, base_params, data.batch(np.array([i]), loc_idx))
    for k, v in m.items():
      out.setdefault(k, []).append(float(v))
  return {f"val/{k}": float(np.mean(v)) for k, v in out.items()}


def fit(editor: MEND, cfg: TrainConfig, base_params, train: EditData, val: EditData, workdir: str,
        seed: int = 0, meta: Mapping | None = None, fault: Callable | None = None,
        progress: bool = True) -> tuple[TrainState, dict]:
  """The training loop. Resumes from workdir/checkpoints if present; keeps workdir/best.

  Writes workdir/metrics.jsonl (one JSON object per logged step or validation). Returns the final
  state and a summary dict. Stops at max_steps or after `patience` validations without improvement.
  """
  from tqdm.auto import tqdm

  os.makedirs(workdir, exist_ok=True)
  tx = make_optimizer(cfg)
  meta = dict(meta or {})
  meta.update(ckpt_lib.model_fingerprint(editor))
  mngr = ckpt_lib.Checkpoints(workdir, meta)
  state = init_state(editor, tx, seed)
  state, extra = mngr.restore_latest(state)
  best_val = extra.get("best_val", float("inf"))
  bad_vals = extra.get("bad_vals", 0)
  start = int(state.step)
  train_step = make_train_step(editor, cfg, fault)
  eval_step = make_eval_step(editor, cfg)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  acc: dict[str, list] = {}
  bar = tqdm(total=cfg.max_steps, initial=start, disable=not progress, desc="train MEND", dynamic_ncols=True)
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
