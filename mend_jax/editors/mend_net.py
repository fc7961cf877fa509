"""MEND's config and network: a low-rank residual MLP that starts as the identity.

One layer, on rows x: [N, d] with per-row mode m (the index of the edited layer among the layers
that share this network; FiLM-style scale/offset per mode):
    y = x + act(scale[m] * ((x V) U + b) + shift[m])
with V: [d, r], U: [r, d], r = min(rank, d). U and b start at zero, scale at 1 and shift at 0, so
every layer, and the whole network, is exactly the identity at initialisation.

act is ReLU whose derivative at exactly 0 is 1 (torch.clamp(min=0) semantics): at initialisation
every pre-activation is exactly 0, and with jax.nn.relu's derivative 0 there no gradient would ever
reach U and the editor could never start training.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def relu_grad1(x: jax.Array) -> jax.Array:
  """max(x, 0) with d/dx = 1 at x == 0 (jnp.where picks the x branch there)."""
  return jnp.where(x >= 0, x, jnp.zeros_like(x))


AGGREGATIONS = ("sum", "least_squares", "malmen")
ROWS = ("all", "answer")


@dataclasses.dataclass(frozen=True)
class MENDConfig:
  """Hyperparameters of MEND (names follow the official config where they exist).

  rank: rank r of U V (capped at the width). n_hidden: residual layers = n_hidden + 1.
  v_init: "xavier_uniform" (this project's default) or "normal" (the official code: unscaled N(0,1)).
  identity_init: U starts at zero, so the network starts as the identity (the paper); False draws
    U like V (the paper's "no identity init" ablation).
  combine: one network on concat(u, delta) (official default). Otherwise separate networks, one of
    them replaced by the identity with x_only / delta_only / one_sided (only the smaller side transformed).
  shared: one network per distinct weight shape, FiLM scale/offset per layer (official default);
    False gives every layer its own network.
  norm: normalise u and delta with running statistics.
  edit_lr: initial value of each layer's learned step alpha.
  descent: W' = W - alpha * grad~ (the paper). False reproduces the official code's W + alpha * grad~.
  aggregation: how a layer's token rows make its update grad~: "sum" (the paper: sum_t delta~_t
    u~_t^T) or "least_squares" (the matrix whose outputs on the keys u~ best match delta~, ridge
    lambda_l learned per layer: lambda (K^T K + lambda I)^-1 K^T D, K = u~ rows, D = delta~ rows;
    `capture.least_squares`). The factor lambda keeps its scale: lambda -> infinity gives the sum.
    "malmen" (MALMEN, Tan et al. 2024): the ridge fit on the layer's real inputs instead of u~,
    (K^T K + lambda I)^-1 K^T V with K = the masked u rows and V_t = (u_t . u~_t) delta~_t, each
    row's own change of the output at its input (`capture.malmen_values`): with fewer rows than
    d_in and a small lambda, every edit's input gets exactly the output change its own row asks
    for, whatever the other edits.
  rows: which token rows of each layer go through the network: "all" (the paper: every token
    with a non-zero u and delta) or "answer" (as MALMEN: only the positions whose outputs the
    edit loss reads, batch["read_pos"], in every edited layer; batches without read positions
    use all rows).
  log_lambda: initial log(lambda_l / d_in_l) of every layer (least_squares, malmen): lambda starts at the
    layer's input width times exp(log_lambda), the squared norm of a normalised key, so that one
    key's update starts at half the sum's whatever the width (a fixed lambda = 1 starts a 128-wide
    layer's updates at about 1/128 of the sum's, and training at the lambda step lr_lr is slow to
    recover). The learned parameter is log(lambda_l) itself.
  chunk: rows per call of the network (0: all rows in one call); larger batches of edits then
    hold one chunk's activations at a time (recomputed for the gradient).
  edit_steps: how many times one edit applies the editor (1: the paper). Step s > 1 captures u
    and delta again on the weights that step s - 1 left and applies the same networks, alpha and
    statistics to them, so later steps act on what the edit loss still asks for; training
    differentiates through all steps. Each step costs one more forward and backward pass.
  preserve: gamma >= 0 of a key-preservation term (least_squares only; 0: none). The ridge
    penalty lambda I of the solve becomes lambda (I + gamma C~), C~ the second moment of each
    edited layer's inputs on the training split's locality examples, scaled to mean eigenvalue 1
    (`capture.key_penalty_root`; MEMIT's covariance term): the update then changes least what
    typical inputs produce. C~ is measured once on the frozen model before training
    (`MEND.prepare`) and stored with the editor.
  preserve_rows: the locality examples' rows C~ is measured on: "answer" (the positions where
    their answers are read, batch["read_pos"], in every edited layer) or "all" (every row the
    editor would see with rows="all").
  refine: after the editor's steps, this many steps of FT+KL on the edited matrices (0: none, the
    paper): RMSprop at refine_lr (clipped as FT) on refine_c_edit * L_e(edit batch) +
    KL(p_start || p_current) on refine_loc_rows locality examples drawn from a pool each step, the
    reference p_start being the model the edit started from. The editor's step does most of the
    edit and the steps give back what it cost other inputs. An edit then needs a locality pool
    (`with_loc_pool`; evaluation uses the training split's); training ignores it (the networks
    train on the editor's steps alone), so a trained editor can be refined at edit time
    (`mend-evaluate --refine N`).
  """

  rank: int = 1920
  n_hidden: int = 1
  v_init: str = "xavier_uniform"
  identity_init: bool = True
  combine: bool = True
  x_only: bool = False
  delta_only: bool = False
  one_sided: bool = False
  shared: bool = True
  norm: bool = True
  edit_lr: float = 1e-4
  descent: bool = True
  aggregation: str = "sum"
  rows: str = "all"
  log_lambda: float = 0.0
  chunk: int = 0
  edit_steps: int = 1
  preserve: float = 0.0
  preserve_rows: str = "answer"
  refine: int = 0
  refine_lr: float = 1e-3
  refine_c_edit: float = 0.1
  refine_loc_rows: int = 125

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"MENDConfig.rank must be >= 1, got {self.rank}")
    if self.n_hidden < 0:
      raise ValueError(f"MENDConfig.n_hidden must be >= 0, got {self.n_hidden}")
    if self.v_init not in ("xavier_uniform", "normal"):
      raise ValueError(f"MENDConfig.v_init must be 'xavier_uniform' or 'normal', got {self.v_init!r}")
    if sum([self.x_only, self.delta_only, self.one_sided]) > 1:
      raise ValueError("MENDConfig: at most one of x_only, delta_only, one_sided may be set")
    if self.combine and (self.x_only or self.delta_only or self.one_sided):
      raise ValueError("MENDConfig.combine cannot be used with x_only, delta_only or one_sided")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"MENDConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
    if self.rows not in ROWS:
      raise ValueError(f"MENDConfig.rows must be one of {ROWS}, got {self.rows!r}")
    if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
      raise ValueError(f"MENDConfig.chunk must be an integer >= 0 (0: no chunking), got {self.chunk!r}")
    if isinstance(self.edit_steps, bool) or not isinstance(self.edit_steps, int) or self.edit_steps < 1:
      raise ValueError(f"MENDConfig.edit_steps must be an integer >= 1, got {self.edit_steps!r}")
    if isinstance(self.preserve, bool) or not isinstance(self.preserve, (int, float)) or not 0 <= self.preserve < math.inf:
      raise ValueError(f"MENDConfig.preserve must be a number >= 0 (0: no preservation term), got {self.preserve!r}")
    if self.preserve_rows not in ROWS:
      raise ValueError(f"MENDConfig.preserve_rows must be one of {ROWS}, got {self.preserve_rows!r}")
    if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
      raise ValueError(f"MENDConfig.refine must be an integer >= 0 (0: no refinement), got {self.refine!r}")
    if isinstance(self.refine_lr, bool) or not (isinstance(self.refine_lr, (int, float)) and 0 < self.refine_lr < math.inf):
      raise ValueError(f"MENDConfig.refine_lr must be a number > 0, got {self.refine_lr!r}")
    if isinstance(self.refine_c_edit, bool) or not (isinstance(self.refine_c_edit, (int, float)) and 0 <= self.refine_c_edit < math.inf):
      raise ValueError(f"MENDConfig.refine_c_edit must be a number >= 0, got {self.refine_c_edit!r}")
    if isinstance(self.refine_loc_rows, bool) or not isinstance(self.refine_loc_rows, int) or self.refine_loc_rows < 1:
      raise ValueError(f"MENDConfig.refine_loc_rows must be an integer >= 1, got {self.refine_loc_rows!r}")
    if self.preserve and self.aggregation != "least_squares":
      raise ValueError(f"MENDConfig.preserve weighs the ridge penalty of aggregation='least_squares'; "
                       f"aggregation is {self.aggregation!r}")


class LowRankResidual(nn.Module):
  """y = x + act(scale[m] * ((x V) U + b) + shift[m]). x: [N, d], modes: [N] int."""

  rank: int
  n_modes: int
  v_init: str = "xavier_uniform"
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, modes: jax.Array) -> jax.Array:
    d = x.shape[-1]
    r = min(self.rank, d)
    v_init = (nn.initializers.xavier_uniform() if self.v_init == "xavier_uniform"
              else nn.initializers.normal(stddev=1.0))
    v = self.param("v", v_init, (d, r), jnp.float32)
    u = self.param("u", nn.initializers.zeros if self.identity_init else v_init, (r, d), jnp.float32)
    b = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    scale = self.param("mode_scale", nn.initializers.ones, (self.n_modes, d), jnp.float32)
    shift = self.param("mode_shift", nn.initializers.zeros, (self.n_modes, d), jnp.float32)
    pre = (x @ v) @ u + b
    pre = pre * scale[modes] + shift[modes]
    return x + relu_grad1(pre)


class ResidualMLP(nn.Module):
  """n_layers LowRankResidual layers in sequence (x: [N, d], modes: [N])."""

  rank: int
  n_layers: int
  n_modes: int
  v_init: str
  identity_init: bool = True

  @nn.compact
  def __call__(self, x, modes):
    for i in range(self.n_layers):
      x = LowRankResidual(self.rank, self.n_modes, self.v_init, self.identity_init, name=f"layer{i}")(x, modes)
    return x


class MENDNet(nn.Module):
  """Maps (u, delta) rows to (pseudo-activations u~, pseudo-deltas delta~).

  u: [N, d_in], delta: [N, d_out], modes: [N] int in [0, n_modes). Inputs already normalised.
  """

  cfg: MENDConfig
  n_modes: int

  @nn.compact
  def __call__(self, u, delta, modes):
    cfg = self.cfg
    net = lambda name: ResidualMLP(cfg.rank, cfg.n_hidden + 1, self.n_modes, cfg.v_init, cfg.identity_init, name=name)
    if cfg.combine:
      out = net("mlp")(jnp.concatenate([u, delta], -1), modes)
      return out[:, : u.shape[-1]], out[:, u.shape[-1]:]
    edit_u, edit_d = True, True
    if cfg.x_only:
      edit_d = False
    elif cfg.delta_only:
      edit_u = False
    elif cfg.one_sided:
      # As the official code: transform the smaller side (cheaper), pass the larger one through.
      edit_u, edit_d = u.shape[-1] <= delta.shape[-1], u.shape[-1] > delta.shape[-1]
    u_out = net("mlp_u")(u, modes) if edit_u else u
    d_out = net("mlp_delta")(delta, modes) if edit_d else delta
    return u_out, d_out
