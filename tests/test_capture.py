"""The one-pass capture gives per-token u and delta whose rank-1 sum is the true weight gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import FAMILY_NAMES, make_batch, tiny_model
from mend_jax import capture, losses, models


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


def test_default_editable_layers_follow_the_paper():
  paths = {n: tiny_model(n).layer_paths for n in ("gpt2", "t5", "t5_gated", "bart", "bert", "llama")}
  assert paths["gpt2"] == tuple(f"transformer/h/{i}/mlp/{m}/kernel" for i in (1, 2, 3) for m in ("c_fc", "c_proj"))
  assert paths["t5"] == tuple(
      [f"encoder/block/{i}/layer/1/DenseReluDense/{m}/kernel" for i in (1, 2) for m in ("wi", "wo")]
      + [f"decoder/block/{i}/layer/2/DenseReluDense/{m}/kernel" for i in (1, 2) for m in ("wi", "wo")])
  assert paths["t5_gated"][0].endswith("/DenseReluDense/wi_0/kernel") and len(paths["t5_gated"]) == 8
  assert paths["bart"] == tuple(
      [f"model/encoder/layers/{i}/{m}/kernel" for i in (1, 2) for m in ("fc1", "fc2")]
      + [f"model/decoder/layers/{i}/{m}/kernel" for i in (1, 2) for m in ("fc1", "fc2")])
  assert paths["bert"] == tuple(
      f"bert/encoder/layer/{i}/{m}/dense/kernel" for i in (1, 2, 3) for m in ("intermediate", "output"))
  assert paths["llama"] == tuple(
      f"model/layers/{i}/mlp/{m}/kernel" for i in (1, 2, 3) for m in ("down_proj", "gate_proj", "up_proj"))


def test_regex_override_and_errors():
  model = tiny_model("gpt2")
  one = model.with_layers([r"h/0/mlp/c_proj/kernel$"])
  assert one.layer_paths == ("transformer/h/0/mlp/c_proj/kernel",)
  with pytest.raises(ValueError, match="matched no parameter"):
    model.with_layers([r"nothing/like/this"])
  with pytest.raises(ValueError, match="not a valid regular expression"):
    model.with_layers([r"h/(0"])
  with pytest.raises(ValueError, match="only 2-D"):
    model.with_layers([r"c_fc/bias$"])


def test_unknown_family_is_a_clear_error():
  import transformers as tf

  with pytest.raises(ValueError, match="model_type 'roberta' is not supported"):
    models.model_from_config(tf.RobertaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=8))


def test_load_model_from_local_directory(tmp_path):
  """The real from_pretrained path, on a directory the test writes (no hub)."""
  model = tiny_model("gpt2")
  model.hf_model.save_pretrained(tmp_path / "m", params=model.params)
  loaded = models.load_model(str(tmp_path / "m"))
  assert loaded.layer_paths == model.layer_paths
  batch = make_batch(model)
  fwd = jax.jit(lambda m, p, b: m.logits(p, b), static_argnums=0)
  np.testing.assert_allclose(fwd(loaded, loaded.params, batch), fwd(model, model.params, batch), atol=1e-6)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_model(str(tmp_path / "missing"))
