"""MEND: pseudo-gradients from the captured u and delta, and the pure edit function.

Per edited layer l, with u, delta from `capture` and mask = tokens where both are non-zero:
  1. u_n, delta_n = normalise(u), normalise(delta) with the running statistics of l's editor;
  2. (u~, delta~) = g_l(u_n, delta_n), g_l the editor for l's weight shape, in mode l;
  3. grad~_l = sum over masked tokens (all edits of the batch) of delta~_t u~_t^T, or with
     aggregation="least_squares" the ridge solve over those rows (`capture.least_squares`), or
     with "malmen" the ridge fit on the real inputs u (`capture.malmen_values`);
  4. W~_l = W_l - alpha_l * grad~_l.
With edit_steps = S > 1, steps 1-4 run S times, each on a new capture of the weights the step
before left (`MENDConfig.edit_steps`). With refine = N > 0, N steps of FT+KL follow on the edited
matrices, with the model the edit started from as the locality reference (`MENDConfig.refine`).
Only the editable leaves change; every other leaf of the returned tree is the input leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mend_jax import capture as capture_lib
from mend_jax import losses, tree
from mend_jax import stats as stats_lib
from mend_jax.editors.base import Editor, EditorState, update_norms
from mend_jax.editors.ft import FT, FTKLConfig
from mend_jax.editors.mend_net import MENDConfig, MENDNet
from mend_jax.models import EditableModel


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers that share one editor network. layer_ids index model.layers; a layer's mode is its
  position in layer_ids."""

  key: str
  layer_ids: tuple[int, ...]
  d_in: int
  d_out: int


def make_groups(model: EditableModel, shared: bool) -> tuple[Group, ...]:
  """One group per distinct (d_in, d_out) of the editable layers (shared), or one per layer."""
  groups: dict[str, list[int]] = {}
  for i, layer in enumerate(model.layers):
    groups.setdefault(layer.shape_key if shared else f"layer{i}", []).append(i)
  return tuple(Group(k, tuple(ids), model.layers[ids[0]].d_in, model.layers[ids[0]].d_out)
               for k, ids in groups.items())


class MEND(Editor):
  """A MEND editor for one model and one set of editable layers.

  State: EditorState(params={"net": {group: network params}, "alpha": [n_layers] learned steps,
  with least squares also "log_lambda": [n_layers]}, aux={group: {"u": RunningStats, "delta":
  RunningStats}}), the normalisation statistics; with cfg.preserve also aux["preserve"] =
  {"layer<i>": R_i [d_in, d_in]}, the root of each layer's ridge penalty (`prepare`); with
  cfg.refine, edits also need aux["refine"] = {"rng", "loc_pool"} (`with_loc_pool`).

  Usage:
    editor = MEND(model, MENDConfig(rank=64))
    state = editor.init(jax.random.PRNGKey(0))
    new_params, info = editor.jit_edit(state, params, batch)
  """

  name = "mend"
  config_class = MENDConfig
  learned = True
  static_edit_args = ("diagnostics",)

  def __init__(self, model: EditableModel, cfg: MENDConfig = MENDConfig()):
    super().__init__(model, cfg)
    self.groups = make_groups(model, cfg.shared)
    self.nets = {g.key: MENDNet(cfg, n_modes=len(g.layer_ids)) for g in self.groups}
    self.needs_loc_pool = bool(cfg.refine)
    self.refiner = FT(model, FTKLConfig(lr=cfg.refine_lr, max_steps=cfg.refine, c_edit=cfg.refine_c_edit,
                                        loc_batch_size=cfg.refine_loc_rows)) if cfg.refine else None

  def with_loc_pool(self, state: EditorState, loc_pool: Mapping[str, jax.Array]) -> EditorState:
    """With cfg.refine: `state` with the locality pool its refinement steps draw from (as FT+KL's
    `with_loc_pool`: a batch dict whose arrays share a leading dimension N >= refine_loc_rows).
    Without: `state` unchanged."""
    if not self.cfg.refine:
      return state
    n = len(next(iter(loc_pool.values()))) if isinstance(loc_pool, Mapping) and loc_pool else None
    if n is not None and n < self.cfg.refine_loc_rows:
      raise ValueError(f"the locality pool has {n} examples, fewer than MENDConfig.refine_loc_rows="
                       f"{self.cfg.refine_loc_rows} (drawn at each refinement step)")
    pool = self.refiner.with_loc_pool(self.refiner.init(jax.random.PRNGKey(0), None), loc_pool).aux
    return EditorState(state.params, {**state.aux, "refine": pool})

  # ---------------------------------------------------------------- state
  def init(self, rng: jax.Array, base_params=None) -> EditorState:
    """Identity-initialised networks, alpha = edit_lr, empty statistics, identity penalty roots
    (`prepare` measures them; base_params unused)."""
    del base_params
    nets = {}
    for i, g in enumerate(self.groups):
      u = jnp.zeros((1, g.d_in), jnp.float32)
      d = jnp.zeros((1, g.d_out), jnp.float32)
      nets[g.key] = self.nets[g.key].init(jax.random.fold_in(rng, i), u, d, jnp.zeros((1,), jnp.int32))["params"]
    alpha = jnp.full((len(self.model.layers),), self.cfg.edit_lr, jnp.float32)
    st = {g.key: {"u": stats_lib.init(g.d_in), "delta": stats_lib.init(g.d_out)} for g in self.groups}
    params = {"net": nets, "alpha": alpha}
    if self.cfg.aggregation in ("least_squares", "malmen"):
      params["log_lambda"] = jnp.asarray([self.cfg.log_lambda + math.log(layer.d_in) for layer in self.model.layers],
                                         jnp.float32)
    if self.cfg.preserve:
      st["preserve"] = {f"layer{i}": jnp.eye(layer.d_in, dtype=jnp.float32) for i, layer in enumerate(self.model.layers)}
    return EditorState(params, st)

  def prepare(self, state: EditorState, base_params, data, max_rows: int = 2048, batch_size: int = 32) -> EditorState:
    """With cfg.preserve: state with each layer's penalty root R = (I + gamma C~)^(-1/2)
    (`capture.key_penalty_root`), C~ the second moment of the layer's input rows over the
    locality examples of up to max_rows records of `data` (an EditData, the training split) on
    the frozen base_params: the rows `capture` keeps with rows=cfg.preserve_rows ("answer": the
    positions where the locality answers are read, in every layer; "all": every row the editor
    would see). Without cfg.preserve: state unchanged."""
    if not self.cfg.preserve:
      return state
    n = min(len(data), max_rows)
    if n == 0:
      raise ValueError("MEND.prepare: the data has no records to measure the layers' inputs on")

    @jax.jit
    def moments(base, batch, weight):  # the model is an argument: a closed-over one would be a constant
      cap = self.capture(base, batch, rows=self.cfg.preserve_rows)
      masks = self.masks(cap)
      return {l.path: capture_lib.second_moment(cap.u[l.path], masks[l.path] & weight[:, None])
              for l in self.model.layers}

    total = None
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      weight = idx < n  # one compiled shape: the last chunk repeats its last row, counted zero times
      m = jax.device_get(moments(base_params, data.loc.take(np.minimum(idx, n - 1)), jnp.asarray(weight)))
      total = m if total is None else {p: (total[p][0] + m[p][0], total[p][1] + m[p][1]) for p in total}
    roots = {f"layer{i}": jnp.asarray(capture_lib.key_penalty_root(*total[l.path], self.cfg.preserve))
             for i, l in enumerate(self.model.layers)}
    # Where init placed them; a state made without the term (an editor given one later) has none: as alpha.
    old = state.aux.get("preserve") or {k: state.params["alpha"] for k in roots}
    roots = {k: jax.device_put(v, old[k].sharding) for k, v in roots.items()}
    return EditorState(state.params, {**state.aux, "preserve": roots})

  def _precond(self, aux: Mapping, i: int):
    """Layer i's penalty root R, or None without cfg.preserve."""
    return aux["preserve"][f"layer{i}"] if self.cfg.preserve else None

  # ---------------------------------------------------------------- pieces
  def capture(self, params, batch, rows: str | None = None) -> capture_lib.Capture:
    """u [B,T',d_in] and delta [B,T',d_out] of the editable layers for the edit loss: the sum over the batch's edits of
    each edit's token-mean NLL, so one edit's delta has the same scale whatever k edits share the
    batch (`losses.nll_per_edit_sum`; the official code's batch token mean scales it by 1/k).
    T' = T, or the read positions P in layers that keep only those, or T-1 in a causal LM (below)."""
    if rows not in (None, "all", "answer"):
      raise ValueError(f"MEND.capture: rows must be None (cfg.rows), 'all' or 'answer', got {rows!r}")
    task = self.model.task
    cap = capture_lib.capture(self.model, params, batch,
                              loss_fn=lambda logits, b: losses.nll_per_edit_sum(task, logits, b))
    # The last block's MLP feeds the head position by position: its delta is exactly zero off
    # the read positions, so only those rows (B x P instead of B x T) go through the editor.
    # With rows="answer" every layer keeps only those rows (its other rows are dropped).
    # Padding slots of read_pos (read_mask 0) repeat position 0 and are zeroed.
    # rows: as cfg.rows unless given.
    local = self.model.head_local_paths if (rows or self.cfg.rows) == "all" else tuple(self.model.layer_paths)
    if "read_pos" not in batch:
      local = ()
    at_read = lambda x: x
    if local:
      pos = batch["read_pos"].astype(jnp.int32)[:, :, None]
      keep = (batch["read_mask"] != 0)[:, :, None]
      at_read = lambda x: jnp.where(keep, jnp.take_along_axis(x, pos, axis=1), 0)
    # A causal LM predicts nothing from its last position, so every layer's delta is exactly zero
    # there: the other layers drop that row before the editor (B x (T-1) rows).
    rest = (lambda x: x[:, :-1]) if task == "causal_lm" else (lambda x: x)
    u = {p: at_read(x) if p in local else rest(x) for p, x in cap.u.items()}
    delta = {p: at_read(x) if p in local else rest(x) for p, x in cap.delta.items()}
    return cap._replace(u=u, delta=delta)

  def masks(self, cap: capture_lib.Capture) -> dict[str, jax.Array]:
    """{path: [B,T] bool}: the rows of each layer that take part (u and delta both non-zero)."""
    return {l.path: capture_lib.token_mask(cap.u[l.path], cap.delta[l.path]) for l in self.model.layers}

  def update_stats(self, stats: dict, cap: capture_lib.Capture) -> dict:
    """Statistics with this batch's masked u and delta rows added (pooled over each group's layers)."""
    masks = self.masks(cap)
    new = {}
    for g in self.groups:
      s_u, s_d = stats[g.key]["u"], stats[g.key]["delta"]
      for i in g.layer_ids:
        p = self.model.layers[i].path
        s_u = stats_lib.update(s_u, cap.u[p], masks[p])
        s_d = stats_lib.update(s_d, cap.delta[p], masks[p])
      new[g.key] = {"u": s_u, "delta": s_d}
    for key in ("preserve", "refine"):
      if key in stats:
        new[key] = stats[key]
    return new

  def pseudo_factors(self, net_params: dict, stats: dict, cap: capture_lib.Capture):
    """{path: (u~ [N, d_in], delta~ [N, d_out])}, N = all token rows of the layer, masked rows zero.

    The rows of every layer of a group go through the group's network in one call, each row
    tagged with its layer's mode."""
    masks = self.masks(cap)
    out = {}
    for g in self.groups:
      paths = [self.model.layers[i].path for i in g.layer_ids]
      us = [cap.u[p].reshape(-1, g.d_in).astype(jnp.float32) for p in paths]
      ds = [cap.delta[p].reshape(-1, g.d_out).astype(jnp.float32) for p in paths]
      sizes = [u.shape[0] for u in us]
      u_all, d_all = jnp.concatenate(us), jnp.concatenate(ds)
      modes = jnp.concatenate([jnp.full((n,), m, jnp.int32) for m, n in enumerate(sizes)])
      mask = jnp.concatenate([masks[p].reshape(-1) for p in paths])[:, None].astype(jnp.float32)
      if self.cfg.norm:
        u_all = stats_lib.normalize(stats[g.key]["u"], u_all)
        d_all = stats_lib.normalize(stats[g.key]["delta"], d_all)
      u_t, d_t = self._run_net(g.key, net_params[g.key], u_all, d_all, modes)
      # Masked rows (padding, no gradient) take no part in the update.
      u_t, d_t = u_t * mask, d_t * mask
      bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
      for k, p in enumerate(paths):
        out[p] = (u_t[bounds[k]:bounds[k + 1]], d_t[bounds[k]:bounds[k + 1]])
    return out

  def _run_net(self, key: str, net_params, u: jax.Array, d: jax.Array, modes: jax.Array):
    """The network of group `key` on rows u [N, d_in], d [N, d_out]; with cfg.chunk, chunk rows
    at a time (padded to a whole number of chunks), each chunk's activations recomputed for the
    gradient instead of stored."""
    apply = lambda u_, d_, m_: self.nets[key].apply({"params": net_params}, u_, d_, m_)
    c, n = self.cfg.chunk, u.shape[0]
    if not c or n <= c:
      return apply(u, d, modes)
    pad = -n % c
    padded = [jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x for x in (u, d, modes)]
    chunks = [x.reshape((-1, c) + x.shape[1:]) for x in padded]
    u_t, d_t = jax.lax.map(jax.checkpoint(lambda xs: apply(*xs)), tuple(chunks))
    return u_t.reshape((-1,) + u_t.shape[2:])[:n], d_t.reshape((-1,) + d_t.shape[2:])[:n]

  @staticmethod
  def _keys(cap: capture_lib.Capture, masks: Mapping[str, jax.Array], path: str) -> jax.Array:
    """The layer's real inputs u as rows [N, d_in] (float32), masked rows zero (MALMEN's keys)."""
    u = cap.u[path]
    return u.reshape(-1, u.shape[-1]).astype(jnp.float32) * masks[path].reshape(-1, 1)

  def apply_updates(self, editor_params: dict, stats: dict, model_params, cap: capture_lib.Capture,
                    diagnostics: bool = False):
    """New model params from a capture, and info (see `edit`)."""
    factors = self.pseudo_factors(editor_params["net"], stats, cap)
    kernels = tree.get_leaves(model_params, self.model.layer_paths)
    sign = -1.0 if self.cfg.descent else 1.0
    masks = self.masks(cap)
    new, upd_norm = {}, []
    for i, layer in enumerate(self.model.layers):
      u_t, d_t = factors[layer.path]
      if self.cfg.aggregation == "least_squares":
        g = capture_lib.least_squares(u_t, d_t, editor_params["log_lambda"][i], layer.layout,
                                      precond=self._precond(stats, i))
      elif self.cfg.aggregation == "malmen":
        keys = self._keys(cap, masks, layer.path)
        g = capture_lib.least_squares(keys, capture_lib.malmen_values(keys, u_t, d_t), editor_params["log_lambda"][i],
                                      layer.layout, scaled=False)
      else:
        g = capture_lib.rank1_sum(u_t, d_t, layer.layout)
      step = editor_params["alpha"][i] * g
      # In float32, then back to the kernel's dtype (a bfloat16 model keeps bfloat16 kernels).
      w = kernels[layer.path]
      new[layer.path] = (w.astype(jnp.float32) + sign * step).astype(w.dtype)
      upd_norm.append(jnp.linalg.norm(step))
    info = {
        "loss_before": cap.loss,
        "update_norm": jnp.stack(upd_norm),
        "n_tokens": jnp.stack([jnp.sum(masks[l.path]) for l in self.model.layers]).astype(jnp.float32),
    }
    if diagnostics:
      gn, cos = [], []
      for layer in self.model.layers:
        u_t, d_t = factors[layer.path]
        true_g = capture_lib.rank1_sum(cap.u[layer.path], cap.delta[layer.path], layer.layout)
        pseudo = capture_lib.rank1_sum(u_t, d_t, layer.layout)
        gn.append(jnp.linalg.norm(true_g))
        cos.append(jnp.sum(true_g * pseudo) / (jnp.linalg.norm(true_g) * jnp.linalg.norm(pseudo) + 1e-30))
      info["grad_norm"], info["grad_cos"] = jnp.stack(gn), jnp.stack(cos)
    return tree.replace_leaves(model_params, new), info

  def apply_steps(self, editor_params: dict, stats: dict, model_params, batch, cap: capture_lib.Capture,
                  diagnostics: bool = False):
    """`apply_updates` on `cap` (the capture of batch on model_params), then edit_steps - 1 more
    steps, each on a fresh capture of batch on the weights the step before left. info as
    `apply_updates` for the first step, except update_norm: the norm of the whole change."""
    new, info = self.apply_updates(editor_params, stats, model_params, cap, diagnostics)
    if self.cfg.edit_steps == 1:
      return new, info
    for _ in range(self.cfg.edit_steps - 1):
      new, _ = self.apply_updates(editor_params, stats, new, self.capture(new, batch))
    old, cur = (tree.get_leaves(t, self.model.layer_paths) for t in (model_params, new))
    info["update_norm"] = jnp.stack([jnp.linalg.norm(cur[p].astype(jnp.float32) - old[p].astype(jnp.float32))
                                     for p in self.model.layer_paths])
    return new, info

  def patch(self, state: EditorState, params, batch: Mapping[str, jax.Array]):
    """The edit as low-rank factors instead of new weights: ({path: (left, right)}, info) with
    left [rows, r] and right [r, cols] in the kernel's orientation, so that the edited kernel is
    W + left @ right (the same change `edit` makes, in float32; r = the layer's token rows, times
    edit_steps). Sum: left/right are u~ and -alpha delta~ (or transposed); least squares: K^T and
    the dual solve; malmen: the real keys and the dual solve of their values. With edit_steps > 1
    each step's factors are found on the weights the steps before left, and concatenated.
    Pure and jittable; the batch is not checked here (`mend_jax.edit_log.EditLog` checks it)."""
    if self.cfg.refine:
      raise ValueError(f"MENDConfig.refine={self.cfg.refine}: refinement steps fine-tune whole matrices, so the edit "
                       "is not a low-rank patch; use refine=0 for patches")
    cap = self.capture(params, batch)
    out = self._patch_step(state, cap)
    current = params
    for _ in range(self.cfg.edit_steps - 1):
      kernels = tree.get_leaves(current, self.model.layer_paths)
      current = tree.replace_leaves(current, {
          p: (w.astype(jnp.float32) + out[p][0] @ out[p][1]).astype(w.dtype) for p, w in kernels.items()})
      step = self._patch_step(state, self.capture(current, batch))
      out = {p: (jnp.concatenate([out[p][0], step[p][0]], 1), jnp.concatenate([out[p][1], step[p][1]], 0))
             for p in out}
    return out, {"loss_before": cap.loss}

  def _patch_step(self, state: EditorState, cap: capture_lib.Capture) -> dict:
    """One step's {path: (left, right)} factors from a capture (`patch`)."""
    factors = self.pseudo_factors(state.params["net"], state.aux, cap)
    sign = -1.0 if self.cfg.descent else 1.0
    masks = self.masks(cap)
    out = {}
    for i, layer in enumerate(self.model.layers):
      u_t, d_t = (x.reshape(-1, x.shape[-1]).astype(jnp.float32) for x in factors[layer.path])
      if self.cfg.aggregation == "least_squares":
        # With a penalty root R: R (K R)^T X, X the dual solve on the keys K R; left factor (K R R)^T.
        r = self._precond(state.aux, i)
        u_t = u_t if r is None else u_t @ r
        d_t = capture_lib.least_squares_dual(u_t, d_t, state.params["log_lambda"][i])
        u_t = u_t if r is None else u_t @ r
      elif self.cfg.aggregation == "malmen":  # K^T (K K^T + lambda I)^-1 V: left factor the real keys
        keys = self._keys(cap, masks, layer.path)
        d_t = capture_lib.least_squares_dual(keys, capture_lib.malmen_values(keys, u_t, d_t),
                                             state.params["log_lambda"][i], scaled=False)
        u_t = keys
      d_t = sign * state.params["alpha"][i] * d_t
      out[layer.path] = (u_t.T, d_t) if layer.layout == "in_out" else (d_t.T, u_t)
    return out

  # ---------------------------------------------------------------- the edit
  def _edit(self, state: EditorState, params, batch: Mapping[str, jax.Array], diagnostics: bool = False):
    """MEND's edit (`Editor.edit` checks the inputs around it): one or k edits, their updates summed.

    Args:
      state: the editor's state (networks, alpha, statistics).
      params: the model's parameters.
      batch: an edit batch in the model's format (`mend_jax.models`), k edits of length T.
      diagnostics: also compare each layer's pseudo-gradient with the true gradient.
    Returns:
      (new_params, info), info = {loss_before: [], update_norm: [L] (Frobenius norm of
      alpha_l * grad~_l), n_tokens: [L] rows that took part; with diagnostics also grad_norm: [L]
      of the true gradient and grad_cos: [L] cosine between true gradient and grad~; with
      cfg.refine also loss_loc: [] the last refinement step's KL, and update_norm is that of the
      whole change}. Pure: compose it with jax.jit / jax.vmap freely (`jit_edit` is the jitted form).
    """
    if self.cfg.refine and "refine" not in state.aux:
      raise ValueError(f"MENDConfig.refine={self.cfg.refine} needs a locality pool for its FT+KL steps: "
                       "state = editor.with_loc_pool(state, pool) (a batch dict of locality examples)")
    cap = self.capture(params, batch)
    new, info = self.apply_steps(state.params, state.aux, params, batch, cap, diagnostics)
    if self.cfg.refine:
      new, tuned = self.refiner.fine_tune(state.aux["refine"], params, batch, start=new, until_success=False)
      info.update(loss_loc=tuned["loss_loc"], update_norm=update_norms(self.model, params, new))
    return new, info

  def edit_for_training(self, editor_params: dict, stats: dict, params, batch):
    """The training-time edit: statistics first absorb this edit batch (as in the official code),
    then the edit uses them. Returns (new_params, new_stats, info); differentiable wrt editor_params."""
    cap = self.capture(params, batch)
    new_stats = self.update_stats(stats, cap) if self.cfg.norm else stats
    new_params, info = self.apply_steps(editor_params, new_stats, params, batch, cap)
    return new_params, new_stats, info

  # ---------------------------------------------------------------- training
  def param_labels(self, train_params: dict) -> dict:
    """The networks train with lr ("net"); the per-layer steps alpha (and least squares' per-layer
    log lambda) with lr_lr ("alpha")."""
    labels = {"net": jax.tree_util.tree_map(lambda _: "net", train_params["net"]), "alpha": "alpha"}
    if "log_lambda" in train_params:
      labels["log_lambda"] = "alpha"
    return labels

  def loss(self, train_params: dict, aux: dict, base_params, batch, objective: losses.Objective,
           train: bool = True):
    """Algorithm 1's loss of one micro-batch {"edit", "equiv", "loc"}: edit with batch["edit"],
    then objective.c_edit * L_e(equiv) + objective.c_loc * KL(p_base || p_edited)(loc).
    Training (train=True) first absorbs the edit batch into the normalisation statistics (as the
    official code); validation keeps them frozen. Returns (loss, (new_stats, metrics))."""
    if train:
      new_params, new_stats, info = self.edit_for_training(train_params, aux, base_params, batch["edit"])
    else:
      cap = self.capture(base_params, batch["edit"])
      new_params, info = self.apply_steps(train_params, aux, base_params, batch["edit"], cap)
      new_stats = aux
    loss, metrics = losses.post_edit_loss(self.model, new_params, base_params, batch, objective)
    metrics.update(loss_before=info["loss_before"], update_norm=jnp.mean(info["update_norm"]))
    return loss, (new_stats, metrics)
