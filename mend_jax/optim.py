"""The editor's optimizer: global-norm clipping, Adam with one learning rate per parameter label,
and gradient accumulation, as one fused update.

It computes what `optax.chain(optax.clip_by_global_norm(c), optax.multi_transform({label:
optax.adam(lr)}, labels))` (wrapped in `optax.MultiSteps` when accumulating) computes, and is
tested against it (tests/test_optim.py). The difference is the program XLA gets: each parameter
leaf's clip, both moment updates, bias corrections and its own update are one elementwise
function of (parameter, gradient, mu, nu) with three outputs, so XLA makes one pass over the
four arrays and writes the three results in place of the donated ones. optax's chain hands XLA
separate tree maps (clipped gradients, moments, an updates tree, then `apply_updates`), which it
materialises: on the 59M-parameter editor of the 6x768 benchmark that is 236 MB of temporaries
and about 1.5 GB more memory traffic per step (docs/scale.md).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


class OptState(NamedTuple):
  """count [] int32: Adam updates made; mu, nu: Adam's moments (the parameters' tree);
  acc: the running mean of this accumulation window's gradients (None without accumulation);
  mini_step [] int32: micro-steps in the current window."""

  count: jax.Array
  mu: dict
  nu: dict
  acc: dict | None
  mini_step: jax.Array


class ClippedAdam(NamedTuple):
  """Clip by global norm, then Adam with learning rate `lrs[label]` for the leaves `labels` marks
  label, applied every `accumulate` micro-steps to the mean of their gradients.

  lrs: label -> a float or an optax schedule of the Adam update count (evaluated before the
    update, as optax's scale_by_schedule does).
  labels: params -> a tree of labels of the same structure (the editor's `param_labels`).
  """

  lrs: Mapping[str, float | Schedule]
  labels: Callable[[dict], dict]
  max_norm: float
  accumulate: int = 1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def init(self, params) -> OptState:
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    acc = zeros() if self.accumulate > 1 else None
    return OptState(jnp.zeros((), jnp.int32), zeros(), zeros(), acc, jnp.zeros((), jnp.int32))

  def apply(self, grads, state: OptState, params, grad_norm: jax.Array | None = None):
    """(new params, new state) after one micro-step with `grads` (grad_norm: their global norm,
    if the caller has it; used without accumulation)."""
    if self.accumulate == 1:
      return self._adam(grads, state, params, grad_norm)
    n = state.mini_step
    acc = jax.tree_util.tree_map(lambda a, g: a + (g - a) / (n + 1).astype(a.dtype), state.acc, grads)

    def emit(params, state):
      new_params, new_state = self._adam(acc, state, params)
      return new_params, new_state._replace(acc=jax.tree_util.tree_map(jnp.zeros_like, acc),
                                            mini_step=jnp.zeros_like(n))

    def hold(params, state):
      return params, state._replace(acc=acc, mini_step=n + 1)

    return jax.lax.cond(n + 1 >= self.accumulate, emit, hold, params, state)

  def _adam(self, grads, state: OptState, params, norm=None):
    norm = optax.global_norm(grads) if norm is None else norm
    # One scalar factor (optax divides each gradient by the norm, then multiplies): a multiply is
    # cheap enough for XLA to repeat in both moments' updates instead of storing clipped gradients.
    scale = jnp.where(norm < self.max_norm, 1.0, self.max_norm / norm)
    count = state.count + 1
    bc1 = 1 - self.b1 ** count.astype(jnp.float32)
    bc2 = 1 - self.b2 ** count.astype(jnp.float32)
    rates = {label: (lr(state.count) if callable(lr) else jnp.asarray(lr, jnp.float32))
             for label, lr in self.lrs.items()}

    def leaf(label, p, g, m, v):
      g = g * scale.astype(g.dtype)
      m = (1 - self.b1) * g + self.b1 * m
      v = (1 - self.b2) * jnp.square(g) + self.b2 * v
      step = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + self.eps)
      return p - rates[label].astype(p.dtype) * step, m, v

    # Labels may name whole subtrees (a prefix of the parameters' tree, as optax allows): one per leaf.
    labels = jax.tree_util.tree_map(lambda label, sub: jax.tree_util.tree_map(lambda _: label, sub),
                                    self.labels(params), params)
    out = jax.tree_util.tree_map(leaf, labels, params, grads, state.mu, state.nu)
    outer = jax.tree_util.tree_structure(params)
    new_params, mu, nu = jax.tree_util.tree_transpose(outer, jax.tree_util.tree_structure((0, 0, 0)), out)
    return new_params, state._replace(count=count, mu=mu, nu=nu)
