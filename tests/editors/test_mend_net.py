"""MEND's network: identity at initialisation for every option, the ReLU whose gradient at 0 is 1
(without it the editor cannot start training), the rank cap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_batch, tiny_model
from mend_jax import losses, tree
from mend_jax.editors import MEND, MENDConfig
from mend_jax.editors import mend_net

_flat = tree.flatten


def test_relu_gradient_at_zero_is_one():
  g = jax.grad(lambda x: jnp.sum(mend_net.relu_grad1(x)))(jnp.array([-1.0, 0.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 1.0])


def _training_loss_grads(model, ed, state, batch, loc_batch):
  def loss(editor_params):
    new, _, _ = ed.edit_for_training(editor_params, state.aux, model.params, batch)
    l_edit = losses.nll(model.task, model.logits(new, batch), batch)
    kl = losses.locality_kl(model.task, model.logits(model.params, loc_batch), model.logits(new, loc_batch), loc_batch)
    return 0.1 * l_edit + kl
  return jax.jit(jax.grad(loss))(state.params)


def test_zero_initialised_matrices_get_gradient_at_init(monkeypatch):
  """The ReLU trap: at init every pre-activation is exactly 0. The editor's relu must pass gradient
  there, or U (zero-initialised) never moves. With jax.nn.relu the same test sees zero gradient."""
  model = tiny_model("gpt2")
  batch, loc = make_batch(model, seed=6), make_batch(model, seed=7)
  ed = MEND(model, MENDConfig(rank=8, edit_lr=1e-2))
  state = ed.init(jax.random.PRNGKey(0))
  g = _training_loss_grads(model, ed, state, batch, loc)
  for key, net in g["net"].items():
    for layer in ("layer0", "layer1"):
      assert float(jnp.abs(net["mlp"][layer]["u"]).max()) > 0, (key, layer)
  assert float(jnp.abs(g["alpha"]).max()) > 0

  monkeypatch.setattr(mend_net, "relu_grad1", jax.nn.relu)  # the trap, to show the check bites
  ed_bad = MEND(model, MENDConfig(rank=8, edit_lr=1e-2))
  g_bad = _training_loss_grads(model, ed_bad, state, batch, loc)
  assert all(float(jnp.abs(net["mlp"]["layer0"]["u"]).max()) == 0 for net in g_bad["net"].values())


def test_editor_options_build_and_keep_identity_at_init():
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=40)
  ref, _ = MEND(model, MENDConfig(rank=4, norm=False)).jit_edit(
      MEND(model, MENDConfig(rank=4, norm=False)).init(jax.random.PRNGKey(0)), model.params, batch)
  for cfg in (dict(combine=False), dict(combine=False, x_only=True), dict(combine=False, delta_only=True),
              dict(combine=False, one_sided=True), dict(shared=False), dict(n_hidden=2), dict(v_init="normal")):
    ed = MEND(model, MENDConfig(rank=4, norm=False, **cfg))
    new, _ = ed.jit_edit(ed.init(jax.random.PRNGKey(0)), model.params, batch)
    for p in model.layer_paths:
      np.testing.assert_allclose(_flat(new)[p], _flat(ref)[p], rtol=1e-5, atol=1e-8, err_msg=str(cfg))
  assert len(MEND(model, MENDConfig(shared=False)).groups) == len(model.layers)
  # The "no identity init" ablation really starts elsewhere.
  ed = MEND(model, MENDConfig(rank=4, norm=False, identity_init=False))
  new, _ = ed.jit_edit(ed.init(jax.random.PRNGKey(0)), model.params, batch)
  p = model.layer_paths[0]
  assert not np.allclose(_flat(new)[p], _flat(ref)[p], rtol=1e-3, atol=1e-6)
  with pytest.raises(ValueError, match="combine cannot be used"):
    MENDConfig(x_only=True)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    MENDConfig(rank=0)


def test_low_rank_width_is_capped():
  model = tiny_model("gpt2")
  ed = MEND(model, MENDConfig(rank=1920))
  net = ed.init(jax.random.PRNGKey(0)).params["net"]["16x64"]["mlp"]["layer0"]
  assert net["v"].shape == (80, 80) and net["u"].shape == (80, 80)
