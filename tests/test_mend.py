"""MEND editor and edit: identity init is an SGD step, the ReLU trap, padding, stats, compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import make_batch, tiny_model
from mend_jax import capture
from mend_jax import editor as editor_lib
from mend_jax import losses
from mend_jax import stats as stats_lib
from mend_jax.editor import EditorConfig
from mend_jax.mend import MEND, check_batch


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _randomize_net(state, key, scale=0.05):
  """An editor that is not the identity (as after training), so tests are not vacuous."""
  leaves, treedef = jax.tree_util.tree_flatten(state.params["net"])
  keys = jax.random.split(key, len(leaves))
  net = treedef.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return state._replace(params={**state.params, "net": net})


@pytest.mark.parametrize("name", ["gpt2", "t5_gated", "bert"])
def test_identity_editor_is_one_sgd_step(name):
  model = tiny_model(name)
  batch = make_batch(model, seed=4, batch=3, pad=1)
  ed = MEND(model, EditorConfig(rank=8, norm=False, edit_lr=1.0))
  state = ed.init(jax.random.PRNGKey(0))
  new, info = ed.jit_edit(state, model.params, batch)
  # Reference: one plain SGD step (lr 1) of the editable kernels, via jax.grad, on the sum over
  # the edits of each edit's own token-mean loss, built here by a loop over one-row batches.
  def loss(p, b):
    rows = [{k: v[i:i + 1] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]
    return sum(losses.nll(model.task, model.logits(p, r), r) for r in rows)
  grads = _flat(jax.jit(jax.grad(loss))(model.params, batch))
  before, after = _flat(model.params), _flat(new)
  assert set(before) == set(after)
  for path, w in before.items():
    if path in model.layer_paths:
      ref = w - grads[path]
      assert float(jnp.abs(grads[path]).max()) > 0
      # float32: two ways of computing the gradient differ by rounding, ~1e-6 of its largest entry.
      np.testing.assert_allclose(after[path], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(grads[path]).max()))
    else:
      np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(w), err_msg=path)
  np.testing.assert_allclose(info["loss_before"], loss(model.params, batch), rtol=1e-6)


def test_official_sign_convention_is_gradient_ascent():
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=5)
  descent = MEND(model, EditorConfig(rank=8, norm=False, edit_lr=1.0))
  ascent = MEND(model, EditorConfig(rank=8, norm=False, edit_lr=1.0, descent=False))
  state = descent.init(jax.random.PRNGKey(0))
  p_d, _ = descent.jit_edit(state, model.params, batch)
  p_a, _ = ascent.jit_edit(state, model.params, batch)
  w0 = _flat(model.params)
  for path in model.layer_paths:
    np.testing.assert_allclose(_flat(p_a)[path] - w0[path], -(_flat(p_d)[path] - w0[path]), rtol=1e-5, atol=1e-7)


def test_relu_gradient_at_zero_is_one():
  g = jax.grad(lambda x: jnp.sum(editor_lib.relu_grad1(x)))(jnp.array([-1.0, 0.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 1.0])


def _training_loss_grads(model, ed, state, batch, loc_batch):
  def loss(editor_params):
    new, _, _ = ed.edit_for_training(editor_params, state.stats, model.params, batch)
    l_edit = losses.nll(model.task, model.logits(new, batch), batch)
    kl = losses.locality_kl(model.task, model.logits(model.params, loc_batch), model.logits(new, loc_batch), loc_batch)
    return 0.1 * l_edit + kl
  return jax.jit(jax.grad(loss))(state.params)


def test_zero_initialised_matrices_get_gradient_at_init(monkeypatch):
  """The ReLU trap: at init every pre-activation is exactly 0. The editor's relu must pass gradient
  there, or U (zero-initialised) never moves. With jax.nn.relu the same test sees zero gradient."""
  model = tiny_model("gpt2")
  batch, loc = make_batch(model, seed=6), make_batch(model, seed=7)
  ed = MEND(model, EditorConfig(rank=8, edit_lr=1e-2))
  state = ed.init(jax.random.PRNGKey(0))
  g = _training_loss_grads(model, ed, state, batch, loc)
  for key, net in g["net"].items():
    for layer in ("layer0", "layer1"):
      assert float(jnp.abs(net["mlp"][layer]["u"]).max()) > 0, (key, layer)
  assert float(jnp.abs(g["alpha"]).max()) > 0

  monkeypatch.setattr(editor_lib, "relu_grad1", jax.nn.relu)  # the trap, to show the check bites
  ed_bad = MEND(model, EditorConfig(rank=8, edit_lr=1e-2))
  g_bad = _training_loss_grads(model, ed_bad, state, batch, loc)
  assert all(float(jnp.abs(net["mlp"]["layer0"]["u"]).max()) == 0 for net in g_bad["net"].values())


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_extra_right_padding_gives_the_same_edit(name):
  model = tiny_model(name)
  ed = MEND(model, EditorConfig(rank=8, edit_lr=1e-2))
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
  # Non-trivial statistics, gathered from another batch.
  stats = ed.update_stats(state.stats, jax.jit(lambda p, b: capture.capture(model, p, b))(
      model.params, make_batch(model, seed=8, batch=4)))
  state = state._replace(stats=stats)
  a, _ = ed.jit_edit(state, model.params, make_batch(model, seed=9))
  b, _ = ed.jit_edit(state, model.params, make_batch(model, seed=9, pad=5))
  delta_a = {p: _flat(a)[p] - _flat(model.params)[p] for p in model.layer_paths}
  assert all(float(jnp.abs(d).max()) > 0 for d in delta_a.values())
  for p in model.layer_paths:
    np.testing.assert_allclose(_flat(b)[p], _flat(a)[p], rtol=1e-5, atol=1e-6)


def test_stats_merge_of_halves_equals_whole_and_float64_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 7, 5)).astype(np.float32) * 3 + 1
  mask = rng.random((6, 7)) > 0.3
  whole = stats_lib.update(stats_lib.init(5), x, mask)
  halves = stats_lib.merge(stats_lib.from_batch(x[:3], mask[:3]), stats_lib.from_batch(x[3:], mask[3:]))
  for a, b in zip(whole, halves):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  rows = x.reshape(-1, 5)[mask.reshape(-1)].astype(np.float64)
  assert float(whole.count) == rows.shape[0]
  np.testing.assert_allclose(whole.mean, rows.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats_lib.std(whole), rows.std(0, ddof=1), rtol=1e-5)
  z = stats_lib.normalize(whole, jnp.asarray(rows, jnp.float32))
  np.testing.assert_allclose(np.asarray(z).mean(0), 0, atol=1e-5)
  # Masked-out rows (here: huge values) never reach the statistics.
  x2 = np.where(mask[..., None], x, 1e6).astype(np.float32)
  np.testing.assert_allclose(stats_lib.update(stats_lib.init(5), x2, mask).mean, whole.mean, rtol=1e-6)


def test_edit_stats_pool_the_layers_of_one_editor():
  model = tiny_model("gpt2")
  ed = MEND(model, EditorConfig(rank=4))
  assert [g.key for g in ed.groups] == ["16x64", "64x16"]
  assert [len(g.layer_ids) for g in ed.groups] == [3, 3]
  batch = make_batch(model, seed=10)
  cap = jax.jit(lambda p, b: capture.capture(model, p, b))(model.params, batch)
  st = ed.update_stats(ed.init(jax.random.PRNGKey(0)).stats, cap)
  masks = ed.masks(cap)
  n = sum(int(masks[model.layers[i].path].sum()) for i in ed.groups[0].layer_ids)
  assert float(st["16x64"]["u"].count) == n


def test_edit_compiles_once_per_batch_shape():
  model = tiny_model("gpt2")
  ed = MEND(model, EditorConfig(rank=8))
  state = ed.init(jax.random.PRNGKey(0))
  ed.jit_edit(state, model.params, make_batch(model, seed=11))
  ed.jit_edit(state, model.params, make_batch(model, seed=12))
  assert ed.jit_edit._cache_size() == 1
  ed.jit_edit(state, model.params, make_batch(model, seed=12, length=10))
  assert ed.jit_edit._cache_size() == 2  # the counter does count a new shape


def test_vmap_over_edits_equals_a_loop():
  model = tiny_model("gpt2")
  ed = MEND(model, EditorConfig(rank=8, edit_lr=1e-2))
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(2))
  batches = [make_batch(model, seed=20 + i, batch=1) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batches)
  vmapped, _ = jax.jit(jax.vmap(ed.edit, in_axes=(None, None, 0)))(state, model.params, stacked)
  for i, b in enumerate(batches):
    single, _ = ed.jit_edit(state, model.params, b)
    for p in model.layer_paths:
      np.testing.assert_allclose(_flat(vmapped)[p][i], _flat(single)[p], rtol=1e-5, atol=1e-7)


def test_batch_of_k_edits_sums_the_single_edit_updates():
  """The edit loss of k edits is the sum of each edit's token-mean NLL, so each edit's rows are
  those it has alone; the editor is row-wise, so (without normalisation) the update of k edits at
  once is exactly the sum of the k single-edit updates, even for a non-identity editor."""
  model = tiny_model("gpt2")
  ed = MEND(model, EditorConfig(rank=8, norm=False, edit_lr=1e-2))
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(3))
  b1 = make_batch(model, seed=30, batch=1, n_labels=3)
  b2 = make_batch(model, seed=31, batch=1, n_labels=2)  # a different number of target tokens
  both = jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y]), b1, b2)
  w0 = _flat(model.params)
  d = lambda params: {p: _flat(params)[p] - w0[p] for p in model.layer_paths}
  d1, d2, d12 = (d(ed.jit_edit(state, model.params, b)[0]) for b in (b1, b2, both))
  for p in model.layer_paths:
    assert float(jnp.abs(d1[p]).max()) > 0 and float(jnp.abs(d2[p]).max()) > 0
    np.testing.assert_allclose(d12[p], d1[p] + d2[p], rtol=1e-4, atol=1e-7)


def test_editor_options_build_and_keep_identity_at_init():
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=40)
  ref, _ = MEND(model, EditorConfig(rank=4, norm=False)).jit_edit(
      MEND(model, EditorConfig(rank=4, norm=False)).init(jax.random.PRNGKey(0)), model.params, batch)
  for cfg in (dict(combine=False), dict(combine=False, x_only=True), dict(combine=False, delta_only=True),
              dict(combine=False, one_sided=True), dict(shared=False), dict(n_hidden=2), dict(v_init="normal")):
    ed = MEND(model, EditorConfig(rank=4, norm=False, **cfg))
    new, _ = ed.jit_edit(ed.init(jax.random.PRNGKey(0)), model.params, batch)
    for p in model.layer_paths:
      np.testing.assert_allclose(_flat(new)[p], _flat(ref)[p], rtol=1e-5, atol=1e-8, err_msg=str(cfg))
  assert len(MEND(model, EditorConfig(shared=False)).groups) == len(model.layers)
  with pytest.raises(ValueError, match="combine cannot be used"):
    EditorConfig(x_only=True)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    EditorConfig(rank=0)


def test_low_rank_width_is_capped():
  model = tiny_model("gpt2")
  ed = MEND(model, EditorConfig(rank=1920))
  net = ed.init(jax.random.PRNGKey(0)).params["net"]["16x64"]["mlp"]["layer0"]
  assert net["v"].shape == (80, 80) and net["u"].shape == (80, 80)


def test_bad_batches_get_clear_errors():
  model = tiny_model("gpt2")
  good = make_batch(model)
  with pytest.raises(ValueError, match="missing \\['labels'\\]"):
    check_batch(model, {k: v for k, v in good.items() if k != "labels"})
  with pytest.raises(ValueError, match="no scored token"):
    check_batch(model, {**good, "labels": jnp.full_like(good["labels"], -100)})
  with pytest.raises(ValueError, match="longer than the model's context of 32"):
    check_batch(model, make_batch(model, length=40))
  check_batch(model, good)
