"""KE: the edit is the gated, masked fine-tuning gradient plus an offset, checked against
per-example gradients from jax.grad."""


import chex
import jax
import jax.numpy as jnp
import numpy as np

from conftest import EDITOR_CFGS, editor_setup, tiny_model, wrong_batch
from mend_jax import losses, tree

_flat = tree.flatten


# ---------------------------------------------------------------- KE
def test_ke_edit_is_the_gated_masked_gradient_plus_offset():
  model = tiny_model("gpt2")
  alg, state = editor_setup("ke", "gpt2")
  batch = wrong_batch(model, seed=5)
  emb = "transformer/wte/embedding"
  np.testing.assert_array_equal(np.asarray(state.params["net"]["embed"]["embedding"]),
                                np.asarray(_flat(model.params)[emb]))
  # Host-side init: torch's defaults; weight norm starts at the identity reparametrisation.
  net = state.params["net"]
  wn = net["layer0"]["out"]
  np.testing.assert_allclose(wn["scale"], np.linalg.norm(np.asarray(wn["kernel"]), axis=0), rtol=1e-6)
  lstm = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(net["lstm_fwd"])])
  assert np.abs(lstm).max() <= 1 / EDITOR_CFGS["ke"]["lstm_hidden"] ** 0.5 and lstm.std() > 0.1
  new, info = alg.jit_edit(state, model.params, batch)
  facs = jax.jit(alg.factors)(state.params["net"], batch)

  # Edit b's own fine-tuning gradient: the token-mean NLL with only b's labels scored.
  @jax.jit
  def example_grad(b):
    keep = (jnp.arange(batch["labels"].shape[0]) == b)[:, None]
    lb = {**batch, "labels": jnp.where(keep, batch["labels"], -100)}
    w = tree.get_leaves(model.params, model.layer_paths)
    return jax.grad(lambda w: losses.nll(model.task, model.logits(tree.replace_leaves(model.params, w), lb), lb))(w)

  grads = [example_grad(b) for b in range(batch["labels"].shape[0])]
  for layer, (r, c, p, q, s) in zip(model.layers, facs):
    w = _flat(model.params)[layer.path]
    step = 0.0
    for b in range(len(grads)):
      mask, off = jnp.outer(r[b], c[b]), jnp.outer(p[b], q[b])  # [d_out, d_in]
      if layer.layout == "in_out":
        mask, off = mask.T, off.T
      step = step + s[b] * (grads[b][layer.path] * mask + off)
    np.testing.assert_allclose(_flat(new)[layer.path], w - step, rtol=1e-5, atol=1e-7)
  assert info["gate"].shape == (len(model.layers), 2)
  # Under tracing (a jitted train-state build, eval_shape for parameter counts) flax's own
  # initialisers run instead: the same tree.
  traced = jax.eval_shape(alg.init, jax.random.PRNGKey(0), model.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(traced, state)
