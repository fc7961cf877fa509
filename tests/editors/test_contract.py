"""The contract every editor keeps (MEND, FT, FT+KL, ENN, KE), checked the same way for each:
the state is an EditorState built under jit; the edit changes exactly the editable matrices (the
same set for every editor), keeps dtypes, and shares every other leaf; the jitted edit equals the
eager one; info reports loss_before and the true size of each change; loss gives Algorithm 1's
objective and metrics; param_labels covers the trained leaves."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EDITOR_CFGS, editor_setup, jit_logits, make_batch, wrong_batch
from mend_jax import editors, losses, tree
from mend_jax.editors import Editor, EditorState

METRICS = {"loss", "loss_edit", "loss_loc", "edit_success", "loc_agree", "loss_before", "update_norm"}


def _changed(before, after) -> set:
  b, a = tree.flatten(before), tree.flatten(after)
  assert set(a) == set(b)
  return {p for p in b if not np.array_equal(np.asarray(b[p]), np.asarray(a[p]))}


@pytest.mark.parametrize("name", editors.NAMES)
def test_editor_contract(name):
  ed, state = editor_setup(name, "gpt2")
  model = ed.model
  assert isinstance(ed, Editor) and isinstance(state, EditorState) and ed.name == name
  # The state's shapes come from jax.eval_shape of init (what training and checkpoints rely on).
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(ed.init, jax.random.PRNGKey(0), model.params),
                                                ed.init(jax.random.PRNGKey(0), model.params))
  labels = ed.param_labels(state.params)
  assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(state.params)
  assert set(jax.tree_util.tree_leaves(labels)) <= {"net", "alpha"}

  batch = wrong_batch(model)
  start = ed.pre_edit_params(state, model.params)
  new, info = ed.jit_edit(state, start, batch)
  # Exactly the editable matrices change; dtypes kept; every other leaf is the start's own array.
  assert _changed(start, new) == set(model.layer_paths)
  flat_new, flat_start = tree.flatten(new), tree.flatten(start)
  for p, x in flat_start.items():
    assert flat_new[p].dtype == x.dtype, p
    if p not in model.layer_paths:
      assert flat_new[p] is x, p
  # Same as jax.jit(edit) bit for bit, from the base model too (from_base), and as the eager edit.
  ref, ref_info = jax.jit(ed.edit)(state, start, batch)
  chex.assert_trees_all_equal((new, info), (ref, ref_info))
  chex.assert_trees_all_equal(editors.jit_edit(ed, from_base=True)(state, model.params, batch), (ref, ref_info))
  eager, eager_info = ed.edit(state, start, batch)
  chex.assert_trees_all_close(tree.get_leaves(eager, model.layer_paths), tree.get_leaves(new, model.layer_paths),
                              rtol=1e-4, atol=1e-6)
  # info: the edit loss before (the loss the editor differentiates: FT's is the official batch
  # token mean, the others' the sum of each edit's token mean), and the Frobenius norm of each
  # matrix's change (computed here).
  assert info["loss_before"].shape == () and info["update_norm"].shape == (len(model.layers),)
  logits = jit_logits(model)(start, batch)
  want = losses.nll(model.task, logits, batch) if name in ("ft", "ft_kl") else losses.nll_per_edit_sum(
      model.task, logits, batch)
  np.testing.assert_allclose(info["loss_before"], want, rtol=1e-5)
  norms = [np.linalg.norm(np.asarray(flat_new[p], np.float64) - np.asarray(flat_start[p], np.float64))
           for p in model.layer_paths]
  np.testing.assert_allclose(info["update_norm"], norms, rtol=1e-4, atol=1e-7)
  assert min(norms) > 0

  # loss: Algorithm 1's objective of one micro-batch, finite, with the common metrics.
  mb = {"edit": batch, "equiv": make_batch(model, seed=6), "loc": make_batch(model, seed=7, batch=3)}
  obj = losses.Objective(c_edit=0.3, c_loc=1.0)
  loss, (new_aux, metrics) = jax.jit(ed.loss, static_argnames=("objective", "train"))(
      state.params, state.aux, model.params, mb, objective=obj, train=False)
  assert METRICS <= set(metrics) and np.isfinite(float(loss))
  extra = float(metrics.get("loss_base", 0.0))  # ENN's base-model term
  np.testing.assert_allclose(float(loss), 0.3 * float(metrics["loss_edit"]) + float(metrics["loss_loc"]) + extra,
                             rtol=1e-5)
  chex.assert_trees_all_equal_structs(new_aux, state.aux)


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_every_editor_edits_the_same_layers_of_seq2seq_and_classifier_models(family):
  """A seq2seq model and a binary classifier: every editor changes exactly `model.layer_paths`,
  with finite results (plain FT's loop is FT+KL's without the KL; it runs on gpt2 above)."""
  for name in ("mend", "ft_kl", "enn", "ke"):
    ed, state = editor_setup(name, family)
    start = ed.pre_edit_params(state, ed.model.params)
    new, info = ed.jit_edit(state, start, wrong_batch(ed.model))
    assert _changed(start, new) == set(ed.model.layer_paths), name
    assert bool(tree.all_finite((new, info))), name
    assert info["update_norm"].shape == (len(ed.model.layers),), name


@pytest.mark.parametrize("name", editors.NAMES)
def test_every_editor_checks_its_inputs(name):
  """A bad batch is an error naming the key, before anything runs (eager edit and jit_edit); a
  non-finite parameter is reported instead of edited; check=False skips the checks."""
  ed, state = editor_setup(name, "gpt2")
  model = ed.model
  batch = wrong_batch(model)
  start = ed.pre_edit_params(state, model.params)
  oov = {**batch, "input_ids": batch["input_ids"].at[0, 2].set(model.config.vocab_size + 7)}
  for fn in (ed.edit, ed.jit_edit):
    with pytest.raises(ValueError, match=r"batch\['input_ids'\]\[0, 2\] = 57 is not a token id"):
      fn(state, start, oov)
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] has shape"):
      fn(state, start, {**batch, "attention_mask": batch["attention_mask"][:1]})
  path = "transformer/wte/embedding"
  broken = tree.replace_leaves(start, {path: tree.flatten(start)[path].at[3, 0].set(jnp.nan)})
  with pytest.raises(ValueError, match=f"'{path}' holds NaN or inf values; nothing was edited"):
    ed.jit_edit(state, broken, batch)
  new, _ = ed.jit_edit(state, start, oov, check=False)  # the caller's own responsibility
  assert tree.flatten(new).keys() == tree.flatten(start).keys()


def test_bfloat16_models_keep_bfloat16_kernels_and_match_float32():
  """A bfloat16 base model: every editor edits it and writes bfloat16 kernels back; MEND's edit
  of the same weights in bfloat16 is close to its float32 edit (the weight change within 5% of its
  norm, the edited model's loss within 2%). The comparison uses a step of SGD size: a bfloat16
  kernel cannot hold a change below about 2^-9 of its entries (an untrained editor's 1e-4 step)."""
  from mend_jax import models

  f32 = editor_setup("mend", "gpt2")[0].model
  bf = dataclasses.replace(f32, params=models.as_dtype(f32.params, "bfloat16"))
  bf = dataclasses.replace(bf, hf_model=type(f32.hf_model)(f32.config, dtype=jnp.bfloat16, _do_init=False))
  batch = wrong_batch(f32)
  for name in editors.NAMES:
    ed = editors.make(name, bf, EDITOR_CFGS[name])
    state = ed.with_loc_pool(ed.init(jax.random.PRNGKey(0), bf.params), make_batch(bf, seed=100, batch=6))
    start = ed.pre_edit_params(state, bf.params)
    new, info = ed.jit_edit(state, start, batch)
    assert _changed(start, new) == set(bf.layer_paths), name
    assert all(tree.flatten(new)[p].dtype == jnp.bfloat16 for p in bf.layer_paths), name
    assert bool(tree.all_finite(info)), name
    if name == "mend":
      big = {**EDITOR_CFGS["mend"], "edit_lr": 1.0}
      ed16, ed32 = editors.make("mend", bf, big), editors.make("mend", f32, big)
      state = ed32.init(jax.random.PRNGKey(0))
      new, _ = ed16.jit_edit(state, start, batch)
      new32, _ = ed32.jit_edit(state, f32.params, batch)
      for p in bf.layer_paths:
        d32 = np.asarray(tree.flatten(new32)[p], np.float64) - np.asarray(tree.flatten(f32.params)[p], np.float64)
        d16 = np.asarray(tree.flatten(new)[p], np.float64) - np.asarray(tree.flatten(start)[p], np.float64)
        assert np.linalg.norm(d16 - d32) < 0.05 * np.linalg.norm(d32), p
      l32 = float(losses.nll(f32.task, jit_logits(f32)(new32, batch), batch))
      l16 = float(losses.nll(bf.task, jit_logits(bf)(new, batch), batch))
      assert abs(l16 - l32) < 0.02 * l32, (l16, l32)
