"""Cached frozen activations: a forward pass that starts from the cached input of the lowest edited
block gives the full pass's logits, and MEND's training loss and gradients, for GPT-2, Llama and
T5; the compiled program really skips the blocks below; the cache of a dataset (in memory, on
disk, bfloat16) holds exactly what the model computes row by row."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

from mend_jax import editors, losses, models, train

from conftest import V, make_batch, tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_the_training_loss_and_gradients_equal_the_full_computation(family):
  model = tiny_model(family)
  ed = editors.make("mend", model, {"rank": 4})
  state = ed.init(jax.random.PRNGKey(0), model.params)
  # A trained-looking editor: random offsets on every leaf, so the edit is not the identity.
  leaves, treedef = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state = state._replace(params=jax.tree_util.tree_unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  plain = {"edit": make_batch(model, seed=1), "equiv": make_batch(model, seed=2), "loc": make_batch(model, seed=3)}
  block_input = jax.jit(model.block_input)
  cached = {k: {**b, "hidden": block_input(model.params, b)} for k, b in plain.items()}
  objective = losses.Objective(c_edit=0.5, c_loc=1.0)

  def loss(p, batch):
    value, (_, metrics) = ed.loss(p, state.aux, model.params, batch, objective)
    return value, metrics

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l_full, m_full), g_full = grad(state.params, plain)
  (l_cached, m_cached), g_cached = grad(state.params, cached)
  assert float(l_full) > 0
  np.testing.assert_allclose(float(l_cached), float(l_full), rtol=1e-6)
  chex.assert_trees_all_close(m_cached, m_full, rtol=1e-5, atol=1e-6)
  # float32: the two programs fuse differently, so sums round differently (measured: 1.4e-7 at most)
  chex.assert_trees_all_close(g_cached, g_full, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_full)) > 0


def test_the_compiled_forward_skips_the_frozen_blocks_and_uses_the_cache():
  model = models.model_from_config(tf.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=6, n_head=2),
                                   editable=[r"h/5/mlp/c_fc/kernel$"])
  assert model.cache_block == "transformer/h/5"
  batch = make_batch(model, seed=0, batch=4)
  hidden = jax.jit(model.block_input)(model.params, batch)
  full = jax.jit(model.logits)
  flops = lambda b: full.lower(model.params, b).compile().cost_analysis()["flops"]
  with_cache = {**batch, "hidden": hidden}
  # 5 of the 6 blocks are never computed: the program does well under half the arithmetic.
  assert flops(with_cache) < 0.5 * flops(batch)
  np.testing.assert_array_equal(np.asarray(full(model.params, with_cache)), np.asarray(full(model.params, batch)))
  # ... and the forward really starts from the given state.
  assert not np.allclose(full(model.params, {**batch, "hidden": hidden + 1.0}), full(model.params, batch))


def test_a_cached_dataset_holds_what_the_model_computes(synth_setup, tmp_path):
  model, data = synth_setup["model"], synth_setup["data"]
  small = dataclasses.replace(data, **{v: dataclasses.replace(getattr(data, v), **{
      f.name: getattr(getattr(data, v), f.name)[:11] for f in dataclasses.fields(getattr(data, v))
      if getattr(getattr(data, v), f.name) is not None}) for v in ("edit", "equiv", "loc")},
      records=data.records[:11])
  mem = small.with_cached_activations(model, model.params, batch_size=4)  # 11 rows: the last chunk is padded
  disk = small.with_cached_activations(model, model.params, batch_size=4, directory=str(tmp_path), name="t")
  bf16 = small.with_cached_activations(model, model.params, batch_size=4, dtype="bfloat16")
  for view in ("edit", "equiv", "loc"):
    direct = np.stack([np.asarray(model.block_input(model.params, getattr(small, view).take(np.array([i]))))[0]
                       for i in range(11)])
    np.testing.assert_allclose(getattr(mem, view).hidden, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(getattr(disk, view).hidden, getattr(mem, view).hidden)
    assert isinstance(getattr(disk, view).hidden, np.memmap)
    assert getattr(bf16, view).hidden.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(getattr(bf16, view).hidden, np.float32), direct, rtol=1e-2, atol=1e-2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t_edit_float32.npy", "t_equiv_float32.npy",
                                                         "t_loc_float32.npy"]  # no temporary file left
  batch = mem.batch(np.array([0, 3]))
  assert batch["edit"]["hidden"].shape == (2,) + mem.edit.input_ids.shape[1:] + (model.config.n_embd,)
  models.check_batch(model, batch["edit"])
  with pytest.raises(ValueError, match=r"batch\['hidden'\] has shape"):
    models.check_batch(model, {**batch["edit"], "hidden": batch["edit"]["hidden"][:, :3]})
  with pytest.raises(ValueError, match="cached activation dtype must be one of"):
    small.with_cached_activations(model, model.params, dtype="float16")


def test_an_editor_that_trains_the_whole_model_refuses_cached_activations(synth_setup, tmp_path):
  model, data = synth_setup["model"], synth_setup["data"]
  cached = data.with_cached_activations(model, model.params)
  enn = editors.make("enn", model, {})
  assert not enn.frozen_prefix and all(editors.make(n, model, {}).frozen_prefix for n in ("mend", "ft", "ft_kl", "ke"))
  with pytest.raises(ValueError, match="changes the blocks below the edited layers"):
    train.fit(enn, train.TrainConfig(max_steps=1), model.params, cached, cached, str(tmp_path / "enn"))
  assert not (tmp_path / "enn").exists()
