"""ENN: the second-order meta-gradient against central finite differences in float64, and
training never touches the frozen original."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf

from conftest import make_batch, tiny_model
from mend_jax import losses, models, tree
from mend_jax.editors import ENN, EditorState, ENNConfig

_flat = tree.flatten


# ---------------------------------------------------------------- ENN
class _Float64Jnp:
  """jax.numpy with float32 meaning float64: losses.py casts logits to float32 (right for training,
  too coarse for finite differences), so the float64 checks swap this into that module."""

  float32 = jnp.float64

  def __getattr__(self, name):
    return getattr(jnp, name)


@pytest.fixture
def x64(monkeypatch):
  monkeypatch.setattr(losses, "jnp", _Float64Jnp())
  with jax.enable_x64(True):
    yield


@functools.lru_cache(maxsize=None)
def _enn64():
  """A float64 two-block GPT-2 (blocks 0-1 of the tiny GPT-2, built without a second init), its
  ENN, a training batch and the jitted value_and_grad of the ENN loss. Use under the x64 fixture."""
  small = tiny_model("gpt2")
  cfg = tf.GPT2Config(**{**small.config.to_dict(), "n_layer": 2})
  hf = tf.FlaxGPT2LMHeadModel(cfg, dtype=jnp.float64, _do_init=False)
  flat = {p: jnp.asarray(v, jnp.float64) for p, v in _flat(small.params).items()
          if not p.startswith(("transformer/h/2/", "transformer/h/3/"))}
  base = tree.unflatten(flat)
  family = models.FAMILIES["gpt2"]
  model = models.EditableModel(hf, family, models.resolve_layers(base, family.default_editable(cfg), "out_in"), base)
  enn = ENN(model, ENNConfig(edit_lr=0.5))  # a large inner step, so second-order terms matter
  batch = {"edit": make_batch(model, seed=11), "equiv": make_batch(model, seed=11, pad=1),
           "loc": make_batch(model, seed=12, batch=3)}
  vg = jax.jit(jax.value_and_grad(enn.loss, has_aux=True))
  return model, enn, base, batch, vg


def test_enn_meta_gradient_matches_central_finite_differences(x64):
  model, enn, base, batch, vg = _enn64()
  state = enn.init(jax.random.PRNGKey(0), base)
  # theta away from theta0, so L_base has a gradient too.
  rng = np.random.default_rng(3)
  theta = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) + 0.01 * rng.normal(size=x.shape)),
                                 state.params["theta"])
  params = {"theta": theta, "lr": jnp.asarray([0.5, 0.3, 0.4, 0.2], jnp.float64)}
  assert params["lr"].shape == (len(model.layers),)
  (loss, (_, metrics)), grads = vg(params, state.aux, base, batch)
  assert loss.dtype == jnp.float64
  assert float(metrics["loss_base"]) > 0 and float(metrics["loss_loc"]) > 0

  def fd(update, eps=1e-5):
    plus = vg(update(params, eps), state.aux, base, batch)[0][0]
    minus = vg(update(params, -eps), state.aux, base, batch)[0][0]
    return float((plus - minus) / (2 * eps))

  flat_g = _flat(grads["theta"])
  checks = [(f"lr[{i}]", float(grads["lr"][i]),
             lambda p, e, i=i: {**p, "lr": p["lr"].at[i].add(e)}) for i in range(len(model.layers))]
  for path, idx in [(model.layer_paths[0], (1, 2)), (model.layer_paths[-1], (3, 0)),
                    ("transformer/h/0/attn/c_attn/kernel", (2, 5)), ("transformer/wte/embedding", (7, 4))]:
    def upd(p, e, path=path, idx=idx):
      flat = _flat(p["theta"])
      flat[path] = flat[path].at[idx].add(e)
      return {**p, "theta": tree.unflatten(flat)}
    checks.append((f"{path}{idx}", float(flat_g[path][idx]), upd))
  for name, analytic, upd in checks:
    numeric = fd(upd)
    assert abs(analytic) > 1e-8, name
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_enn_training_leaves_the_frozen_original_untouched(x64):
  model, enn, base, batch, vg = _enn64()
  saved = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), base)
  state = enn.init(jax.random.PRNGKey(0), base)
  assert enn.pre_edit_params(state, base) is state.params["theta"]
  # float64 steps, as in the finite-difference test (same compiled loss).
  state = state._replace(params={**state.params, "lr": state.params["lr"].astype(jnp.float64)})
  labels = enn.param_labels(state.params)
  assert labels["lr"] == "alpha" and set(jax.tree_util.tree_leaves(labels["theta"])) == {"net"}
  tx = optax.multi_transform({"net": optax.adam(1e-3), "alpha": optax.adam(1e-2)}, enn.param_labels)
  params, opt = state.params, tx.init(state.params)
  for _ in range(3):
    _, g = vg(params, state.aux, base, batch)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
  chex.assert_trees_all_equal(base, saved)
  moved = _flat(params["theta"])
  for path in (model.layer_paths[0], "transformer/wte/embedding", "transformer/h/0/attn/c_attn/kernel"):
    assert not np.array_equal(np.asarray(moved[path]), _flat(saved)[path]), path
  assert not np.allclose(np.asarray(params["lr"]), 0.5)
  assert enn.pre_edit_params(EditorState(params, state.aux), base) is params["theta"]
