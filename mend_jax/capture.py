"""Per-token layer inputs u and output gradients delta of the editable layers, in one pass.

For a linear layer z = W u + b the gradient of a loss is a sum of per-token rank-1 terms,
dL/dW = sum_t delta_t u_t^T with delta_t = dL/dz_t. We run the model under
`flax.linen.intercept_methods`: each editable module's input u is recorded and its output becomes
z + eps[path] with eps a zero array; the cotangent of eps is exactly delta. One forward and one
backward pass (jax.vjp wrt eps only, so the backward pass stops at the lowest edited layer and
never forms a weight gradient).

The interceptor is installed inside the traced function, so it is part of every compiled program
(an interceptor installed around a jitted call is silently skipped on a cache hit).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from mend_jax import losses
from mend_jax.models import EditableModel


class Capture(NamedTuple):
  """loss: scalar token-mean NLL; logits: the model output;
  u: {path: [B,T,d_in]} layer inputs; delta: {path: [B,T,d_out]} gradients wrt layer outputs.
  (T is the length of the sequence the layer sees: encoder or decoder length for seq2seq.)"""

  loss: jax.Array
  logits: jax.Array
  u: dict[str, jax.Array]
  delta: dict[str, jax.Array]


def _run_intercepted(model: EditableModel, params, batch, on_layer: Callable[[str, jax.Array, jax.Array], jax.Array]):
  """Runs the model; for every editable module call, on_layer(path, u, z) gives the output to use."""
  targets = {l.module_path: l.path for l in model.layers}
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = targets.get("/".join(context.module.path))
    if path is None:
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    seen.append(path)
    return on_layer(path, args[0], out)

  with nn.intercept_methods(interceptor):
    logits = model.logits(params, batch)
  if sorted(seen) != sorted(targets.values()):
    missing = sorted(set(targets.values()) - set(seen))
    repeated = sorted({p for p in seen if seen.count(p) > 1})
    raise ValueError(
        f"editable layers must each be called exactly once per forward pass; "
        f"never called: {missing}, called more than once: {repeated}")
  return logits


def output_shapes(model: EditableModel, params, batch) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape of every editable layer's output for this batch (abstract evaluation, no compute)."""
  shapes: dict[str, Any] = {}

  def record(path, u, z):
    shapes[path] = jax.ShapeDtypeStruct(z.shape, z.dtype)
    return z

  jax.eval_shape(lambda p, b: _run_intercepted(model, p, b, record), params, batch)
  return shapes


def capture(model: EditableModel, params, batch: Mapping[str, jax.Array],
            loss_fn: Callable | None = None) -> Capture:
  """Loss, u and delta of every editable layer of `model` on `batch` (jittable).

  loss_fn(logits, batch) -> scalar defaults to the task's token-mean NLL.
  """
  if loss_fn is None:
    loss_fn = lambda logits, b: losses.nll(model.task, logits, b)
  shapes = output_shapes(model, params, batch)
  eps = {p: jnp.zeros(s.shape, s.dtype) for p, s in shapes.items()}

  def forward(eps):
    us: dict[str, jax.Array] = {}

    def perturb(path, u, z):
      us[path] = u
      return z + eps[path]

    logits = _run_intercepted(model, params, batch, perturb)
    return loss_fn(logits, batch), (logits, us)

  loss, vjp, (logits, us) = jax.vjp(forward, eps, has_aux=True)
  (deltas,) = vjp(jnp.ones_like(loss))
  us = {p: jax.lax.stop_gradient(u) for p, u in us.items()}
  deltas = {p: jax.lax.stop_gradient(d) for p, d in deltas.items()}
  for layer in model.layers:
    u, d = us[layer.path], deltas[layer.path]
    if u.shape[-1] != layer.d_in or d.shape[-1] != layer.d_out:
      raise ValueError(
          f"layer {layer.path}: captured u {u.shape} / delta {d.shape} do not match the kernel's "
          f"(d_in={layer.d_in}, d_out={layer.d_out}) for layout {layer.layout!r}")
  return Capture(loss, logits, us, deltas)


def token_mask(u: jax.Array, delta: jax.Array) -> jax.Array:
  """[..., T] bool: tokens whose u and delta are both non-zero (the only ones that carry gradient).

  Derived from the data, not the attention mask: delta is exactly zero wherever no scored
  prediction depends on the position (padding; in the last block of a causal LM, every position
  that predicts no label)."""
  return jnp.any(u != 0, axis=-1) & jnp.any(delta != 0, axis=-1)


def rank1_sum(u: jax.Array, delta: jax.Array, layout: str) -> jax.Array:
  """sum_t delta_t u_t^T in the kernel's own orientation. u: [..., d_in], delta: [..., d_out]."""
  u2 = u.reshape(-1, u.shape[-1])
  d2 = delta.reshape(-1, delta.shape[-1])
  if layout == "in_out":
    return u2.T @ d2  # [d_in, d_out]
  return d2.T @ u2  # [d_out, d_in]


def least_squares(u: jax.Array, delta: jax.Array, log_lambda: jax.Array, layout: str,
                  scaled: bool = True, precond: jax.Array | None = None) -> jax.Array:
  """The ridge least-squares update of one layer, in the kernel's own orientation:
  lambda (K^T K + lambda I)^-1 K^T D with keys K = u rows [N, d_in], values D = delta rows
  [N, d_out], lambda = exp(log_lambda). The factor lambda keeps the scale of the summed update
  K^T D = `rank1_sum`, which it approaches as lambda -> infinity; a small lambda makes the update
  fit each key's value instead of adding them up. scaled=False drops the factor lambda: the
  plain ridge solution (K^T K + lambda I)^-1 K^T D (`malmen_values`). Float32, by a Cholesky
  factorisation of the smaller Gram matrix: K K^T [N, N] (the dual form,
  K^T (K K^T + lambda I)^-1 D) when N <= d_in, else K^T K [d_in, d_in]. Zero rows (masked
  tokens) take no part.

  precond: R = P^(-1/2) [d_in, d_in] (symmetric) of a positive definite penalty P: the ridge term
  lambda I becomes lambda P, lambda (K^T K + lambda P)^-1 K^T D = R lambda (K'^T K' + lambda I)^-1
  K'^T D with K' = K R (`key_penalty_root`). With P = I + gamma C, C the second moment of a
  layer's typical inputs, the update changes little what those inputs produce (MEMIT's
  preservation term)."""
  k = u.reshape(-1, u.shape[-1]).astype(jnp.float32)
  d = delta.reshape(-1, delta.shape[-1]).astype(jnp.float32)
  if precond is not None:
    r = precond.astype(jnp.float32)
    s = least_squares(k @ r, d, log_lambda, "in_out", scaled)
    s = r @ s
    return s if layout == "in_out" else s.T
  n, d_in = k.shape
  if n <= d_in:
    s = k.T @ least_squares_dual(k, d, log_lambda, scaled)
  else:
    lam = jnp.exp(log_lambda.astype(jnp.float32))
    gram = k.T @ k + lam * jnp.eye(d_in, dtype=jnp.float32)
    s = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), k.T @ d)
    s = lam * s if scaled else s
  return s if layout == "in_out" else s.T  # [d_in, d_out] or [d_out, d_in]


def second_moment(u: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of u_t u_t^T over the masked rows [d, d], their count []), float32. u: [..., d];
  mask: u.shape[:-1]. Sums of several batches add up."""
  x = u.reshape(-1, u.shape[-1]).astype(jnp.float32) * mask.reshape(-1, 1).astype(jnp.float32)
  return x.T @ x, jnp.sum(mask).astype(jnp.float32)


def key_penalty_root(moment: np.ndarray, count: float, gamma: float) -> np.ndarray:
  """R = P^(-1/2) for the ridge penalty P = I + gamma C~ of `least_squares`, C~ = C / (tr C / d)
  with C = moment / count the second moment of a layer's inputs [d, d]: C~ has mean eigenvalue
  1, so gamma weighs it against the identity whatever the inputs' scale. Every eigenvalue of P is
  >= 1: no direction costs less than with the plain ridge, the typical inputs' directions cost
  more. float64 eigh; float32 result. gamma = 0 or no rows: the identity."""
  d = moment.shape[0]
  c = np.asarray(moment, np.float64) / max(float(count), 1.0)
  tr = float(np.trace(c)) / d
  if gamma == 0 or count <= 0 or tr <= 0:
    return np.eye(d, dtype=np.float32)
  p = np.eye(d) + gamma * (c + c.T) / (2 * tr)
  w, v = np.linalg.eigh(p)
  return ((v / np.sqrt(w)) @ v.T).astype(np.float32)


def least_squares_dual(k: jax.Array, d: jax.Array, log_lambda: jax.Array, scaled: bool = True) -> jax.Array:
  """The dual factor X = lambda (K K^T + lambda I)^-1 D [N, d_out] of `least_squares` (whose
  update is K^T X), for keys k [N, d_in] and values d [N, d_out], float32, by Cholesky;
  scaled=False drops the factor lambda."""
  k, d = k.astype(jnp.float32), d.astype(jnp.float32)
  lam = jnp.exp(log_lambda.astype(jnp.float32))
  gram = k @ k.T + lam * jnp.eye(k.shape[0], dtype=jnp.float32)
  x = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), d)
  return lam * x if scaled else x


def malmen_values(keys: jax.Array, u_t: jax.Array, d_t: jax.Array) -> jax.Array:
  """MALMEN's values [N, d_out]: row i is (k_i . u~_i) delta~_i, the change that row i's own
  rank-1 term delta~_i u~_i^T makes to the layer's output at its real input k_i. The ridge fit
  of these values on the real keys (`least_squares(keys, values, log_lambda, layout,
  scaled=False)`) is MALMEN's update: the one matrix whose change of the output at every key is
  closest to that key's own change, instead of the sum of all rows' terms."""
  k = keys.reshape(-1, keys.shape[-1]).astype(jnp.float32)
  u = u_t.reshape(-1, u_t.shape[-1]).astype(jnp.float32)
  return jnp.sum(k * u, -1, keepdims=True) * d_t.reshape(-1, d_t.shape[-1]).astype(jnp.float32)
