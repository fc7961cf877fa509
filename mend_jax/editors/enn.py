"""ENN, Editable Neural Networks (Sinitsin et al. 2020): train the whole model to be editable.

Trained parameters: theta (a copy of every leaf of the base model, label "net") and lr
([n_layers], one inner step size per editable matrix, initial 1e-2, label "alpha").

Edit: theta' = theta - lr_l * grad_{W_l} L_e(theta) on each editable matrix W_l, n_edit_steps
times (official default 1), every other leaf unchanged; L_e is the sum over the batch's edits of
each edit's token-mean NLL (as MEND's edit loss; the official token mean over the whole batch is
the same for one edit, and would shrink each edit's step by 1/k for k edits).

Training loss (second order through the inner step: jax.grad inside jax.grad), on a batch
{"edit", "equiv", "loc"}:
  L = c_edit * L_e(theta' on "equiv") + c_loc * KL(p_ref(loc) || p_theta'(loc))
      + c_base * KL(p_theta0(loc) || p_theta(loc)),
(c_edit, c_loc and the KL positions from the `losses.Objective`, c_base from ENNConfig)
theta0 = base_params, the frozen original model (an argument, never trained). The last term is
the official `base_loss: distill`, computed on the locality batch (trainer.py, train_base). The
locality reference p_ref is theta0 by default (loc_ref="original", as this project's design
specifies); loc_ref="current" uses the pre-edit model theta under stop_gradient, as the official
trainer does (it reads base logits from the model being trained, before the edit).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from mend_jax import losses, tree
from mend_jax.editors.base import Editor, EditorState, update_norms
from mend_jax.models import EditableModel

LOC_REFS = ("original", "current")


@dataclasses.dataclass(frozen=True)
class ENNConfig:
  """edit_lr: initial inner step size of every editable matrix (official 1e-2). n_edit_steps:
  inner SGD steps (official 1). first_order: stop gradients through the inner gradient (official
  option, off). c_base: weight of L_base (official 1; c_edit and c_loc come from the training
  objective). loc_ref: the locality KL's reference, "original" (theta0) or "current" (theta, the
  official trainer)."""

  edit_lr: float = 1e-2
  n_edit_steps: int = 1
  first_order: bool = False
  c_base: float = 1.0
  loc_ref: str = "original"

  def __post_init__(self):
    if self.n_edit_steps < 1:
      raise ValueError(f"ENN n_edit_steps must be >= 1, got {self.n_edit_steps}")
    if self.loc_ref not in LOC_REFS:
      raise ValueError(f"ENN loc_ref must be one of {LOC_REFS}, got {self.loc_ref!r}")


class ENN(Editor):
  """Editable training. Usage:
    enn = ENN(model, ENNConfig())
    state = enn.init(rng, base_params)               # params {"theta": copy of base, "lr": [L]}
    loss, (aux, metrics) = enn.loss(state.params, state.aux, base_params, batch, losses.Objective())
    new_params, info = enn.jit_edit(state, enn.pre_edit_params(state, base_params), edit_batch)
  """

  frozen_prefix = False  # it trains every parameter of its copy of the model

  name = "enn"
  config_class = ENNConfig
  learned = True

  def __init__(self, model: EditableModel, cfg: ENNConfig = ENNConfig()):
    super().__init__(model, cfg)

  def init(self, rng: jax.Array, base_params) -> EditorState:
    """params {"theta": a copy of the base model, "lr": [n_layers] inner steps at edit_lr}; aux {}."""
    del rng
    # A real copy: a training step that donates its state must not free the frozen original.
    theta = jax.tree_util.tree_map(jnp.array, base_params)
    lr = jnp.full((len(self.model.layers),), self.cfg.edit_lr, jnp.float32)
    return EditorState({"theta": theta, "lr": lr}, {})

  def pre_edit_params(self, state: EditorState, base_params):
    """ENN edits its own trained copy of the model, theta."""
    del base_params
    return state.params["theta"]

  def param_labels(self, train_params):
    """theta trains with lr ("net"), the inner step sizes with lr_lr ("alpha")."""
    return {"theta": jax.tree_util.tree_map(lambda _: "net", train_params["theta"]), "lr": "alpha"}

  # ---------------------------------------------------------------- the edit
  def inner(self, theta, lr: jax.Array, batch: Mapping[str, jax.Array]):
    """theta after n_edit_steps SGD steps on the editable matrices; differentiable in theta and lr.
    lr: [n_layers]. Returns (theta', loss_before)."""
    paths = self.model.layer_paths
    if lr.shape != (len(paths),):
      raise ValueError(f"ENN lr has shape {lr.shape}, expected ({len(paths)},) (one per editable matrix)")

    def l_edit(w, params):
      return losses.edit_nll(self.model, tree.replace_leaves(params, w), batch)

    params, loss0 = theta, None
    for _ in range(self.cfg.n_edit_steps):
      w = tree.get_leaves(params, paths)
      loss, g = jax.value_and_grad(l_edit)(w, params)
      loss0 = loss if loss0 is None else loss0
      if self.cfg.first_order:
        g = jax.lax.stop_gradient(g)
      params = tree.replace_leaves(params, {p: w[p] - lr[i].astype(w[p].dtype) * g[p] for i, p in enumerate(paths)})
    return params, loss0

  def _edit(self, state: EditorState, params, batch: Mapping[str, jax.Array]):
    """One inner step (or n_edit_steps) from `params` (normally `pre_edit_params(state, base)`),
    with the learned step sizes state.params["lr"]. Returns (new_params, info), info =
    {loss_before: [], update_norm: [n_layers]}. Pure and jittable (`jit_edit`)."""
    new, loss0 = self.inner(params, state.params["lr"], batch)
    return new, {"loss_before": loss0, "update_norm": update_norms(self.model, params, new)}

  # ---------------------------------------------------------------- training
  def loss(self, train_params, aux, base_params, batch, objective: losses.Objective = losses.Objective(),
           train: bool = True):
    """Editability loss (module docstring) for batch {"edit", "equiv", "loc"}. Returns
    (loss, (aux, metrics)); metrics add loss_base to the common set. `train` is
    unused (ENN carries no statistics)."""
    del train
    losses.check_kl_positions(objective.kl_positions)
    cfg, model = self.cfg, self.model
    theta = train_params["theta"]
    new, loss0 = self.inner(theta, train_params["lr"], batch["edit"])
    loc = losses.loc_batch(batch["loc"], objective.kl_positions)
    orig_logits = jax.lax.stop_gradient(model.logits(base_params, loc))
    theta_logits = model.logits(theta, loc)
    # The locality reference: theta0 (its logits are L_base's too) or theta before the edit.
    ref_logits = orig_logits if cfg.loc_ref == "original" else theta_logits
    loss, metrics = losses.post_edit_loss(model, new, None, batch, objective, ref_logits=ref_logits)
    l_base = losses.locality_kl(model.task, orig_logits, theta_logits, loc)
    loss = loss + cfg.c_base * l_base
    metrics = {**metrics, "loss": loss, "loss_base": l_base, "loss_before": loss0,
               "update_norm": jnp.mean(update_norms(model, theta, new))}
    return loss, (aux, metrics)
