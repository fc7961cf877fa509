"""The one-pass capture gives per-token u and delta whose rank-1 sum is the true weight gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import FAMILY_NAMES, make_batch, tiny_model, with_read
from mend_jax import capture, losses


def _jit_capture(model, batch):
  return jax.jit(lambda p, b: capture.capture(model, p, b))(model.params, batch)


def _true_kernel_grads(model, batch):
  """Reference: jax.grad of the same loss wrt the full parameter tree (no interception)."""
  loss = lambda p, b: losses.nll(model.task, model.logits(p, b), b)
  return traverse_util.flatten_dict(jax.jit(jax.grad(loss))(model.params, batch), sep="/")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_rank1_sum_equals_kernel_gradient(name):
  model = tiny_model(name)
  batch = make_batch(model, seed=1, pad=2)
  cap = jax.jit(lambda p, b: capture.capture(model, p, b))(model.params, batch)
  ref = _true_kernel_grads(model, batch)
  assert len(model.layers) >= 4
  for layer in model.layers:
    g = capture.rank1_sum(cap.u[layer.path], cap.delta[layer.path], layer.layout)
    r = ref[layer.path]
    assert g.shape == r.shape, (layer.path, g.shape, r.shape)
    assert float(jnp.linalg.norm(r)) > 0, f"{layer.path}: reference gradient is zero; test is vacuous"
    rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
    assert rel < 1e-5, f"{name} {layer.path}: relative error {rel}"


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_masked_rows_carry_no_gradient(name):
  """Rows dropped by the data-derived mask contribute exactly nothing to the gradient, and padding
  rows are always dropped."""
  model = tiny_model(name)
  batch = make_batch(model, seed=2, pad=3)
  cap = _jit_capture(model, batch)
  for layer in model.layers:
    u, d = cap.u[layer.path], cap.delta[layer.path]
    m = capture.token_mask(u, d)
    full = capture.rank1_sum(u, d, layer.layout)
    kept = capture.rank1_sum(u * m[..., None], d * m[..., None], layer.layout)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(kept))
    if not layer.path.startswith("decoder") and "decoder" not in layer.path:
      assert not bool(jnp.any(m[:, -3:])), f"{layer.path}: a padding position was kept"


def test_causal_last_block_keeps_only_predicting_positions():
  """In a causal LM's last block only positions that predict a label have non-zero delta."""
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=3, length=8, n_labels=3)
  cap = _jit_capture(model, batch)
  last = [l for l in model.layers if "/h/3/" in l.path][0]
  m = np.asarray(capture.token_mask(cap.u[last.path], cap.delta[last.path]))
  expected = np.zeros_like(m)
  expected[:, 4:7] = True  # positions 4..6 predict the labels at 5..7
  np.testing.assert_array_equal(m, expected)


def test_capture_at_read_positions_equals_full():
  model = tiny_model("gpt2")
  full_b, read_b = with_read(model, make_batch(model, seed=8, batch=2, length=8, n_labels=3, pad=1))
  fn = jax.jit(lambda b: capture.capture(model, model.params, b))
  a, r = fn(full_b), fn(read_b)
  np.testing.assert_allclose(float(r.loss), float(a.loss), rtol=1e-6)
  for p in model.layer_paths:
    np.testing.assert_allclose(np.asarray(r.u[p]), np.asarray(a.u[p]), rtol=1e-6, atol=1e-7)
    # float32 rounding: the two programs sum in different orders, ~1e-7 of the largest entry.
    np.testing.assert_allclose(np.asarray(r.delta[p]), np.asarray(a.delta[p]), rtol=1e-5,
                               atol=1e-6 * float(np.abs(np.asarray(a.delta[p])).max()))
    assert float(jnp.abs(a.delta[p]).max()) > 0
