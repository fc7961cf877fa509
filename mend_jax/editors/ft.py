"""FT and FT+KL: edit by fine-tuning the editable matrices, inside one jitted while_loop.

FT: optimizer steps on L_e(x_e, y_e) (token-mean NLL over the edit batch, as the official)
w.r.t. the editable matrices only, until every edit of the batch succeeds (teacher-forced exact
match of all its label tokens; binary: the sign of the logit) or `max_steps` steps. As the
official code (algs/ft.py): success is checked before each step, so `n_steps` counts the updates
actually applied (0 if the model already gives every target); the gradient is clipped to global
norm `grad_clip`; the optimizer is torch's RMSprop (alpha 0.99, eps 1e-8 outside the square root,
no momentum) by default. Unlike the official loop, the point reached after the last allowed step is
evaluated too, so info["success"] is exact. The lr is model-dependent (official: 5e-6 for the
paper's large models). The whole loop is one jax.lax.while_loop: no host round trip per step.

FT+KL: the same loop on c_edit * L_e + L_loc, L_loc = KL(p_start || p_current) on a fresh
locality mini-batch each step, p_start the model the edit started from (`params` of `edit`).
Locality data: a fixed pool of N locality examples (a batch dict with leading dimension N, in the
model's batch format) held in `EditorState.aux["loc_pool"]`, given by `init(..., loc_pool=)` or
`with_loc_pool`. Step i of an edit reads `loc_batch_size` distinct pool rows drawn with
jax.random from fold_in(fold_in(aux["rng"], h), i), h a cheap hash of the edit's tokens: draws
differ between steps and between edits, and the same edit always sees the same draws.
(The official code draws from the training data with an "oracle" sampler, batch size 1, and
c_edit 1e-2.)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from mend_jax import losses, tree
from mend_jax.editors.base import Editor, EditorState, update_norms
from mend_jax.models import EditableModel

OPTIMIZERS = ("rmsprop", "adam", "sgd")


@dataclasses.dataclass(frozen=True)
class FTConfig:
  """lr: step size (model-dependent; official 5e-6). opt: "rmsprop" (official, torch defaults),
  "adam" or "sgd". max_steps: at most this many updates per edit (official 100). grad_clip: global
  norm clip of each step's gradient (official 100)."""

  lr: float = 5e-6
  opt: str = "rmsprop"
  max_steps: int = 100
  grad_clip: float = 100.0

  def __post_init__(self):
    if self.opt not in OPTIMIZERS:
      raise ValueError(f"FT opt must be one of {OPTIMIZERS}, got {self.opt!r}")
    if not self.lr > 0:
      raise ValueError(f"FT lr must be > 0, got {self.lr}")
    if self.max_steps < 0:
      raise ValueError(f"FT max_steps must be >= 0, got {self.max_steps}")
    if not self.grad_clip > 0:
      raise ValueError(f"FT grad_clip must be > 0, got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class FTKLConfig(FTConfig):
  """FTConfig plus: c_edit (weight of L_e; official FT+KL 1e-2), loc_batch_size (pool rows per
  step; official 1), kl_positions ("answer" or "all", as in training)."""

  c_edit: float = 1e-2
  loc_batch_size: int = 1
  kl_positions: str = "answer"

  def __post_init__(self):
    super().__post_init__()
    if self.loc_batch_size < 1:
      raise ValueError(f"FT+KL loc_batch_size must be >= 1, got {self.loc_batch_size}")
    losses.check_kl_positions(self.kl_positions)


def make_optimizer(cfg: FTConfig) -> optax.GradientTransformation:
  """Gradient clipping, then the configured optimizer at cfg.lr."""
  if cfg.opt == "rmsprop":
    # torch.optim.RMSprop defaults: v starts at 0, decay 0.99, eps added after the square root.
    opt = optax.rmsprop(cfg.lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)
  elif cfg.opt == "adam":
    opt = optax.adam(cfg.lr)
  else:
    opt = optax.sgd(cfg.lr)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def _edit_hash(batch: Mapping[str, jax.Array]) -> jax.Array:
  """A uint32 that differs between edits (position-weighted sum of the token ids)."""
  ids = batch["input_ids"].astype(jnp.uint32)
  w = jnp.arange(1, ids.size + 1, dtype=jnp.uint32).reshape(ids.shape)
  return jnp.sum(ids * w * jnp.uint32(2654435761))


class FT(Editor):
  """Fine-tuning editors: FT (cfg: FTConfig) and FT+KL (cfg: FTKLConfig). Nothing to train: its
  state's params are empty, and `loss` (the interface's default) is the outer loss of its edit.

  Usage:
    ft = FT(model, FTConfig(lr=1e-3))
    state = ft.init(jax.random.PRNGKey(0), params)
    new_params, info = ft.jit_edit(state, params, batch)
    # FT+KL: state = ftkl.init(rng, params, loc_pool=pool)   (pool: a batch dict, leading dim N)
  """

  config_class = FTConfig  # or its subclass FTKLConfig
  learned = False

  def __init__(self, model: EditableModel, cfg: FTConfig = FTConfig()):
    super().__init__(model, cfg)
    self.kl = isinstance(cfg, FTKLConfig)
    self.needs_loc_pool = self.kl
    self.name = "ft_kl" if self.kl else "ft"
    self.tx = make_optimizer(cfg)

  # ---------------------------------------------------------------- state
  def init(self, rng: jax.Array, base_params, loc_pool: Mapping[str, jax.Array] | None = None) -> EditorState:
    """FT: EditorState({}, {}). FT+KL: aux = {"rng": key, "loc_pool": pool} (pool may come later
    through `with_loc_pool`; `edit` fails clearly without one)."""
    del base_params
    if not self.kl:
      if loc_pool is not None:
        raise ValueError("plain FT takes no locality pool; use the 'ft_kl' editor")
      return EditorState({}, {})
    state = EditorState({}, {"rng": rng})
    return self.with_loc_pool(state, loc_pool) if loc_pool is not None else state

  def with_loc_pool(self, state: EditorState, loc_pool: Mapping[str, jax.Array]) -> EditorState:
    """FT+KL: `state` with its locality pool replaced (loc_pool: a batch dict in the model's format
    whose arrays share a leading dimension N >= loc_batch_size). Plain FT: `state` unchanged."""
    if not self.kl:
      return state
    if not isinstance(loc_pool, Mapping) or not loc_pool:
      raise ValueError(f"loc_pool must be a non-empty dict of arrays, got {type(loc_pool).__name__}")
    need = ("input_ids", "attention_mask", "labels") + (
        ("decoder_input_ids", "decoder_attention_mask") if self.model.task == "seq2seq" else ())
    missing = [k for k in need if k not in loc_pool]
    if missing:
      raise ValueError(f"loc_pool for a {self.model.task} model is missing {missing}; it has {sorted(loc_pool)}")
    sizes = {k: jnp.shape(v)[0] if jnp.ndim(v) else None for k, v in loc_pool.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(f"loc_pool arrays must share their leading dimension, got {sizes}")
    n = next(iter(sizes.values()))
    if n < self.cfg.loc_batch_size:
      raise ValueError(f"loc_pool has {n} examples, fewer than loc_batch_size={self.cfg.loc_batch_size}")
    pool = {k: jnp.asarray(v) for k, v in loc_pool.items()}
    return EditorState(state.params, {**state.aux, "loc_pool": pool})

  # ---------------------------------------------------------------- the edit
  def _loc_sample(self, aux, batch, step):
    pool = aux["loc_pool"]
    n = next(iter(pool.values())).shape[0]
    key = jax.random.fold_in(jax.random.fold_in(aux["rng"], _edit_hash(batch)), step)
    idx = jax.random.choice(key, n, (self.cfg.loc_batch_size,), replace=False)
    return losses.loc_batch({k: v[idx] for k, v in pool.items()}, self.cfg.kl_positions)

  def objective(self, w: dict, params, aux, batch, step):
    """Loss of the editable matrices `w` ({path: float32 kernel}) at loop step `step`.
    Returns (loss, (l_edit, l_loc, per-edit success [B]))."""
    model = self.model
    p = tree.replace_leaves(params, w)
    logits = model.logits(p, batch)
    l_edit = losses.nll(model.task, logits, batch)
    success = losses.exact_match(model.task, logits, batch)
    if not self.kl:
      return l_edit, (l_edit, jnp.zeros(()), success)
    loc = self._loc_sample(aux, batch, step)
    ref = jax.lax.stop_gradient(model.logits(params, loc))
    l_loc = losses.locality_kl(model.task, ref, model.logits(p, loc), loc)
    return self.cfg.c_edit * l_edit + l_loc, (l_edit, l_loc, success)

  def _edit(self, state: EditorState, params, batch: Mapping[str, jax.Array]):
    """Fine-tunes the editable matrices of `params` on `batch` (k edits at once) in one
    jax.lax.while_loop. Returns (new_params, info), info = {n_steps: [] int32 updates applied,
    success: [] 1.0 if every edit succeeds at the end, loss_before: [] L_e of `params`,
    loss_edit: [] L_e of the result, loss_loc: [] the last step's L_loc (FT+KL; 0 for FT),
    update_norm: [n_layers]}. Pure and jittable (`jit_edit`)."""
    return self.fine_tune(state.aux, params, batch)

  def fine_tune(self, aux: Mapping, params, batch: Mapping[str, jax.Array], start=None,
                until_success: bool = True):
    """The loop of `_edit` with its starting point and stop rule as arguments: the editable
    matrices start at `start` (a params tree, e.g. another editor's edit of `params`; None:
    `params` itself) while the locality KL's reference stays `params`, and with until_success
    False exactly cfg.max_steps updates are applied whether or not the edits succeed. info as
    `_edit` (loss_before: L_e at the start; update_norm: from `params`)."""
    if self.kl and "loc_pool" not in aux:
      raise ValueError("FT+KL needs a locality pool: init(rng, params, loc_pool=...) or with_loc_pool(state, pool)")
    begin = params if start is None else start
    w0 = {p: k.astype(jnp.float32) for p, k in tree.get_leaves(begin, self.model.layer_paths).items()}
    grad_fn = jax.value_and_grad(self.objective, has_aux=True)

    # Each pass evaluates the current point; it updates only if (until_success) some edit still
    # fails and fewer than max_steps updates were made. So the final point is always evaluated
    # (success is exact) and the program holds a single forward/backward of the model.
    def body(carry):
      n, n_evals, w, opt_state, _, _, loss0, _, _ = carry
      (_, (l_edit, l_loc, success)), g = grad_fn(w, params, aux, batch, n)
      done = jnp.all(success > 0.5)
      stop = (done & until_success) | (n >= self.cfg.max_steps)
      upd, new_opt = self.tx.update(g, opt_state, w)
      new_w = optax.apply_updates(w, upd)
      keep = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(stop, x, y), a, b)
      loss0 = jnp.where(n_evals == 0, l_edit, loss0)
      return (n + (~stop).astype(jnp.int32), n_evals + 1, keep(w, new_w), keep(opt_state, new_opt),
              stop, done, loss0, l_edit, l_loc)

    f32 = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), w0, self.tx.init(w0),
            jnp.zeros((), bool), jnp.zeros((), bool), f32, f32, f32)
    n, _, w, _, _, done, loss0, l_edit, l_loc = jax.lax.while_loop(lambda c: ~c[4], body, init)
    new_params = tree.replace_leaves(params, w)
    info = {"n_steps": n, "success": done.astype(jnp.float32), "loss_before": loss0,
            "loss_edit": l_edit, "loss_loc": l_loc,
            "update_norm": update_norms(self.model, params, new_params)}
    return new_params, info
