"""MEND's edit: identity init is an SGD step, the official sign, padding, pooled statistics,
read-position rows, compilation, vmap and k-edit sums."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_batch, tiny_model, with_read
from mend_jax import capture, losses, tree
from mend_jax.edit_log import EditLog
from mend_jax.editors import MEND, MENDConfig
_flat = tree.flatten


def _randomize_net(state, key, scale=0.05):
  """An editor that is not the identity (as after training), so tests are not vacuous."""
  leaves, treedef = jax.tree_util.tree_flatten(state.params["net"])
  keys = jax.random.split(key, len(leaves))
  net = treedef.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return state._replace(params={**state.params, "net": net})


# A causal LM and a gated seq2seq model (the classifier's capture is checked in test_capture.py).
@pytest.mark.parametrize("name", ["gpt2", "t5_gated"])
def test_identity_editor_is_one_sgd_step(name):
  model = tiny_model(name)
  batch = make_batch(model, seed=4, batch=3, pad=1)
  ed = MEND(model, MENDConfig(rank=8, norm=False, edit_lr=1.0))
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
  np.testing.assert_allclose(info["loss_before"], jax.jit(loss)(model.params, batch), rtol=1e-6)


def test_official_sign_convention_is_gradient_ascent():
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=5)
  descent = MEND(model, MENDConfig(rank=8, norm=False, edit_lr=1.0))
  ascent = MEND(model, MENDConfig(rank=8, norm=False, edit_lr=1.0, descent=False))
  state = descent.init(jax.random.PRNGKey(0))
  p_d, _ = descent.jit_edit(state, model.params, batch)
  p_a, _ = ascent.jit_edit(state, model.params, batch)
  w0 = _flat(model.params)
  for path in model.layer_paths:
    np.testing.assert_allclose(_flat(p_a)[path] - w0[path], -(_flat(p_d)[path] - w0[path]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_extra_right_padding_gives_the_same_edit(name):
  model = tiny_model(name)
  ed = MEND(model, MENDConfig(rank=8, edit_lr=1e-2))
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
  # Non-trivial statistics, gathered from another batch.
  stats = ed.update_stats(state.aux, jax.jit(lambda p, b: capture.capture(model, p, b))(
      model.params, make_batch(model, seed=8, batch=4)))
  state = state._replace(aux=stats)
  a, _ = ed.jit_edit(state, model.params, make_batch(model, seed=9))
  b, _ = ed.jit_edit(state, model.params, make_batch(model, seed=9, pad=5))
  delta_a = {p: _flat(a)[p] - _flat(model.params)[p] for p in model.layer_paths}
  assert all(float(jnp.abs(d).max()) > 0 for d in delta_a.values())
  for p in model.layer_paths:
    np.testing.assert_allclose(_flat(b)[p], _flat(a)[p], rtol=1e-5, atol=1e-6)


def test_edit_stats_pool_the_layers_of_one_editor():
  model = tiny_model("gpt2")
  ed = MEND(model, MENDConfig(rank=4))
  assert [g.key for g in ed.groups] == ["16x64", "64x16"]
  assert [len(g.layer_ids) for g in ed.groups] == [3, 3]
  batch = make_batch(model, seed=10)
  cap = jax.jit(lambda p, b: capture.capture(model, p, b))(model.params, batch)
  st = ed.update_stats(ed.init(jax.random.PRNGKey(0)).aux, cap)
  masks = ed.masks(cap)
  n = sum(int(masks[model.layers[i].path].sum()) for i in ed.groups[0].layer_ids)
  assert float(st["16x64"]["u"].count) == n


def test_edit_compiles_once_per_batch_shape():
  model = tiny_model("gpt2")
  ed = MEND(model, MENDConfig(rank=8))
  state = ed.init(jax.random.PRNGKey(0))
  ed.jit_edit(state, model.params, make_batch(model, seed=11))
  ed.jit_edit(state, model.params, make_batch(model, seed=12))
  assert ed.jit_edit._cache_size() == 1
  ed.jit_edit(state, model.params, make_batch(model, seed=12, length=10))
  assert ed.jit_edit._cache_size() == 2  # the counter does count a new shape


def test_vmap_over_edits_equals_a_loop():
  model = tiny_model("gpt2")
  ed = MEND(model, MENDConfig(rank=8, edit_lr=1e-2))
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
  ed = MEND(model, MENDConfig(rank=8, norm=False, edit_lr=1e-2))
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


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_head_local_layers_have_delta_only_at_read_positions(name):
  """The family knowledge behind MEND's row selection: in the last block's MLP, delta is exactly
  zero off the read positions; so an edit from the selected rows equals the edit from all rows."""
  model = tiny_model(name)
  assert model.head_local_paths
  full_b, read_b = with_read(model, make_batch(model, seed=9, batch=2, length=8, n_labels=3, pad=1))
  cap = jax.jit(lambda b: capture.capture(model, model.params, b))(full_b)
  pos, mask = np.asarray(read_b["read_pos"]), np.asarray(read_b["read_mask"])
  for p in model.head_local_paths:
    d = np.asarray(cap.delta[p])
    off = np.ones(d.shape[:2], bool)
    for i in range(d.shape[0]):
      off[i, pos[i][mask[i] == 1]] = False
    assert np.abs(d[~off]).max() > 0 and np.abs(d[off]).max() == 0, p
  if model.task == "causal_lm":  # nothing is predicted from the last position: zero delta in every layer
    for p in model.layer_paths:
      assert np.abs(np.asarray(cap.delta[p])[:, -1]).max() == 0 and np.abs(np.asarray(cap.delta[p])[:, :-1]).max() > 0
    t = full_b["input_ids"].shape[1]
    assert all(x.shape[1] == t - 1 for p, x in MEND(model, MENDConfig(rank=4)).capture(model.params, full_b).u.items()
               if p not in model.head_local_paths)
  ed = MEND(model, MENDConfig(rank=4))
  st = ed.init(jax.random.PRNGKey(0))
  st = st._replace(aux=jax.jit(lambda b: ed.update_stats(st.aux, ed.capture(model.params, b)))(full_b))
  net = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), st.params["net"])
  st = st._replace(params={**st.params, "net": net})
  a, r = ed.jit_edit(st, model.params, full_b)[0], ed.jit_edit(st, model.params, read_b)[0]
  chex.assert_trees_all_close(r, a, rtol=1e-5, atol=1e-7)


def _ls_reference(u, d, log_lambda):
  """lambda (K^T K + lambda I)^-1 K^T D in float64 numpy, by a plain solve in the primal form."""
  k, v = np.asarray(u, np.float64), np.asarray(d, np.float64)
  lam = np.exp(log_lambda)
  return lam * np.linalg.solve(k.T @ k + lam * np.eye(k.shape[1]), k.T @ v)


@pytest.mark.parametrize("n", [5, 40])  # fewer rows than d_in (the dual form) and more (the primal form)
def test_least_squares_solve_matches_float64(n):
  rng = np.random.default_rng(n)
  u = rng.normal(size=(n, 16)).astype(np.float32)
  d = rng.normal(size=(n, 12)).astype(np.float32)
  u[1] = 0.0  # a masked row takes no part
  for log_lam in (-1.0, 0.5, 3.0):
    want = _ls_reference(u, d, log_lam)
    got = capture.least_squares(jnp.asarray(u), jnp.asarray(d), jnp.float32(log_lam), "in_out")
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(capture.least_squares(u, d, jnp.float32(log_lam), "out_in")), want.T,
                               rtol=2e-4, atol=2e-5 * np.abs(want).max())
  # lambda -> infinity: the summed update sum_t u_t d_t^T; a small lambda fits the values instead.
  big = capture.least_squares(u, d, jnp.float32(25.0), "in_out")
  summed = capture.rank1_sum(jnp.asarray(u), jnp.asarray(d), "in_out")
  np.testing.assert_allclose(np.asarray(big), np.asarray(summed), rtol=1e-3, atol=1e-3 * float(jnp.abs(summed).max()))
  if n < 16:  # more unknowns than rows: the keys' outputs match the values almost exactly
    fit = capture.least_squares(u, d, jnp.float32(-12.0), "in_out") / np.exp(-12.0)
    np.testing.assert_allclose(np.asarray(u @ fit)[[0, 2, 3, 4]], d[[0, 2, 3, 4]], atol=1e-2)


@pytest.mark.parametrize("n", [5, 40])
def test_malmen_update_matches_float64_and_fits_each_key(n):
  """MALMEN: the ridge fit on the real keys K of V_t = (k_t . u~_t) delta~_t, against float64 numpy."""
  rng = np.random.default_rng(10 + n)
  k, u_t = rng.normal(size=(n, 16)).astype(np.float32), rng.normal(size=(n, 16)).astype(np.float32)
  d_t = rng.normal(size=(n, 12)).astype(np.float32)
  k[1], u_t[1], d_t[1] = 0.0, 0.0, 0.0  # a masked row takes no part
  v64 = np.sum(k.astype(np.float64) * u_t, -1, keepdims=True) * d_t
  values = capture.malmen_values(jnp.asarray(k), jnp.asarray(u_t), jnp.asarray(d_t))
  np.testing.assert_allclose(np.asarray(values), v64, rtol=1e-5, atol=1e-5)
  for log_lam in (-1.0, 0.5, 3.0):
    want = _ls_reference(k, v64, log_lam) / np.exp(log_lam)  # (K^T K + lambda I)^-1 K^T V
    got = capture.least_squares(jnp.asarray(k), values, jnp.float32(log_lam), "out_in", scaled=False)
    np.testing.assert_allclose(np.asarray(got), want.T, rtol=2e-4, atol=2e-5 * np.abs(want).max())
  if n < 16:  # fewer keys than inputs: the update changes each key's output by its own row's value
    fit = capture.least_squares(jnp.asarray(k), values, jnp.float32(-12.0), "in_out", scaled=False)
    np.testing.assert_allclose(k @ np.asarray(fit), v64, atol=1e-3 * np.abs(v64).max())
  # lambda -> infinity, times lambda: the sum over rows of k_t V_t^T.
  big = capture.least_squares(jnp.asarray(k), values, jnp.float32(20.0), "in_out", scaled=False) * np.exp(20.0)
  np.testing.assert_allclose(np.asarray(big), k.astype(np.float64).T @ v64, rtol=1e-3, atol=1e-3 * np.abs(v64).max())


def test_malmen_editor_edit_is_the_fit_of_its_own_factors():
  """The editor with aggregation="malmen": its weight change equals -alpha times the float64 ridge
  fit computed here from the captured inputs and the editor's pseudo factors."""
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=5, batch=3)
  ed = MEND(model, MENDConfig(rank=8, aggregation="malmen", log_lambda=-1.0, edit_lr=100.0))  # a step far above float32 rounding of W
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(4))
  np.testing.assert_allclose(np.exp(state.params["log_lambda"]), [np.exp(-1.0) * l.d_in for l in model.layers],
                             rtol=1e-5)
  new, _ = ed.jit_edit(state, model.params, batch)
  cap = ed.capture(model.params, batch)
  factors = ed.pseudo_factors(state.params["net"], state.aux, cap)
  masks = ed.masks(cap)
  for i, layer in enumerate(model.layers):
    k = np.asarray(cap.u[layer.path], np.float64).reshape(-1, layer.d_in) * np.asarray(masks[layer.path]).reshape(-1, 1)
    u_t, d_t = (np.asarray(x, np.float64) for x in factors[layer.path])
    v = np.sum(k * u_t, -1, keepdims=True) * d_t
    lam = float(np.exp(state.params["log_lambda"][i]))
    s = np.linalg.solve(k.T @ k + lam * np.eye(layer.d_in), k.T @ v)  # [d_in, d_out]
    want = -float(state.params["alpha"][i]) * (s if layer.layout == "in_out" else s.T)
    got = np.asarray(_flat(new)[layer.path], np.float64) - np.asarray(_flat(model.params)[layer.path], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert np.abs(want).max() > 0


def test_answer_rows_keep_only_the_read_positions_of_every_layer():
  model = tiny_model("gpt2")
  full_b, read_b = with_read(model, make_batch(model, seed=9, batch=2, length=8, n_labels=3))
  ed = MEND(model, MENDConfig(rank=4, rows="answer"))
  cap_all = MEND(model, MENDConfig(rank=4)).capture(model.params, read_b)
  cap = ed.capture(model.params, read_b)
  pos = np.asarray(read_b["read_pos"])
  lower = [p for p in model.layer_paths if p not in model.head_local_paths]
  assert lower
  for p in lower:  # every row the answer selection keeps is the full capture's row at that position
    assert cap.u[p].shape[1] == pos.shape[1] < cap_all.u[p].shape[1]
    np.testing.assert_array_equal(np.asarray(cap.u[p]), np.take_along_axis(np.asarray(cap_all.u[p]), pos[..., None], 1))
    np.testing.assert_array_equal(np.asarray(cap.delta[p]),
                                  np.take_along_axis(np.asarray(cap_all.delta[p]), pos[..., None], 1))
  with pytest.raises(ValueError, match="rows must be one of"):
    MENDConfig(rows="first")


def test_least_squares_editor_trains_its_lambda_and_differs_from_the_sum():
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=2, batch=3)
  ls = MEND(model, MENDConfig(rank=8, aggregation="least_squares", log_lambda=0.0))
  state = _randomize_net(ls.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
  assert state.params["log_lambda"].shape == (len(model.layers),)
  # lambda starts at each layer's input width (times exp(cfg.log_lambda)).
  init = MEND(model, MENDConfig(rank=8, aggregation="least_squares", log_lambda=-1.0)).init(jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.exp(init.params["log_lambda"]), [np.exp(-1.0) * l.d_in for l in model.layers],
                             rtol=1e-5)
  assert ls.param_labels(state.params)["log_lambda"] == "alpha"
  new, info = ls.jit_edit(state, model.params, batch)
  summed = MEND(model, MENDConfig(rank=8))
  new_sum, _ = summed.jit_edit(state._replace(params={k: v for k, v in state.params.items() if k != "log_lambda"}),
                               model.params, batch)
  p = model.layer_paths[0]
  assert not np.allclose(_flat(new)[p], _flat(new_sum)[p])
  # The gradient reaches log_lambda (so training can set each layer's ridge).
  loss = lambda lp: losses.nll(model.task, model.logits(ls.edit(state._replace(
      params={**state.params, "log_lambda": lp}), model.params, batch, check=False)[0], batch), batch)
  g = jax.jit(jax.grad(loss))(state.params["log_lambda"])
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("aggregation", ["sum", "least_squares", "malmen"])
def test_chunked_editor_network_gives_the_same_edit_and_gradient(aggregation):
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=3, batch=4)  # 4 x 8 rows per layer: chunks of 5 leave a padded last chunk
  whole = MEND(model, MENDConfig(rank=8, aggregation=aggregation))
  chunked = MEND(model, MENDConfig(rank=8, aggregation=aggregation, chunk=5))
  state = _randomize_net(whole.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(2))
  a, _ = whole.jit_edit(state, model.params, batch)
  b, _ = chunked.jit_edit(state, model.params, batch)
  chex.assert_trees_all_close(tree.get_leaves(a, model.layer_paths), tree.get_leaves(b, model.layer_paths),
                              rtol=1e-5, atol=1e-7)

  def loss(ed):
    return lambda net: losses.nll(model.task, model.logits(ed.edit(state._replace(
        params={**state.params, "net": net}), model.params, batch, check=False)[0], batch), batch)

  chex.assert_trees_all_close(jax.jit(jax.grad(loss(whole)))(state.params["net"]),
                              jax.jit(jax.grad(loss(chunked)))(state.params["net"]),
                              rtol=1e-4, atol=1e-7)


def test_bad_aggregation_and_chunk_are_clear_errors():
  with pytest.raises(ValueError, match="aggregation must be one of"):
    MENDConfig(aggregation="mean")
  with pytest.raises(ValueError, match="chunk must be an integer >= 0"):
    MENDConfig(chunk=-1)


@pytest.mark.parametrize("aggregation", ["sum", "least_squares"])
def test_edit_steps_repeat_the_edit_on_the_weights_it_left(aggregation):
  # Reference: the one-step editor applied twice by hand, the second time to the weights the first
  # left; and the patch of a two-step edit (factors of both steps side by side) gives the same weights.
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=6, batch=3, pad=1)
  one = MEND(model, MENDConfig(rank=8, aggregation=aggregation, edit_lr=0.05))
  two = MEND(model, MENDConfig(rank=8, aggregation=aggregation, edit_lr=0.05, edit_steps=2))
  state = _randomize_net(one.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(3))
  state = state._replace(aux=one.update_stats(state.aux, one.capture(model.params, batch)))
  first, _ = one.jit_edit(state, model.params, batch)
  by_hand, _ = one.jit_edit(state, first, batch)
  got, info = two.jit_edit(state, model.params, batch)
  w0, w1, w2, w = (tree.get_leaves(t, model.layer_paths) for t in (model.params, first, by_hand, got))
  for p in model.layer_paths:
    assert float(jnp.abs(w2[p] - w1[p]).max()) > 1e-3 * float(jnp.abs(w1[p] - w0[p]).max())  # the step did something
    # float32 rounding of weights up to ~100 (an untrained editor's large steps): 1e-6 of the largest.
    np.testing.assert_allclose(w[p], w2[p], rtol=1e-5, atol=1e-6 * float(jnp.abs(w2[p]).max()))
  np.testing.assert_allclose(info["update_norm"], [np.linalg.norm(np.asarray(w2[p] - w0[p])) for p in model.layer_paths],
                             rtol=1e-4)
  factors, _ = jax.jit(two.patch)(state, model.params, batch)
  for p in model.layer_paths:
    left, right = factors[p]
    np.testing.assert_allclose(w0[p] + left @ right, w2[p], rtol=1e-5, atol=1e-6 * float(jnp.abs(w2[p]).max()))


def test_edit_steps_train_through_every_step():
  # The training loss of a two-step editor differentiates through both steps: its gradient equals
  # the gradient of the loss built from two one-step edits composed by hand.
  model = tiny_model("gpt2")
  batch = make_batch(model, seed=7, batch=2)
  one = MEND(model, MENDConfig(rank=8, edit_lr=0.05))
  two = MEND(model, MENDConfig(rank=8, edit_lr=0.05, edit_steps=2))
  state = _randomize_net(one.init(jax.random.PRNGKey(1)), jax.random.PRNGKey(4))

  def by_hand(params):
    new, stats, _ = one.edit_for_training(params, state.aux, model.params, batch)
    new, _ = one.apply_updates(params, stats, new, one.capture(new, batch))
    return losses.nll(model.task, model.logits(new, batch), batch)

  def stepped(params):
    new, _, _ = two.edit_for_training(params, state.aux, model.params, batch)
    return losses.nll(model.task, model.logits(new, batch), batch)

  g_ref, g = jax.jit(jax.grad(by_hand))(state.params), jax.jit(jax.grad(stepped))(state.params)
  assert float(jnp.abs(g["alpha"]).max()) > 0
  chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="edit_steps must be an integer >= 1"):
    MENDConfig(edit_steps=0)


def test_refine_fine_tunes_the_edit_against_the_model_it_started_from():
  # Reference: the editor's edit without refinement, then the refinement steps written out by hand:
  # jax.grad of c_edit * (token-mean NLL of the edits) + KL(unedited || current) over every pool
  # row (log_softmax), torch's RMSprop (decay 0.99, eps outside the root) in a Python loop.
  model = tiny_model("gpt2")
  batch, pool = make_batch(model, seed=8, batch=2), make_batch(model, seed=9, batch=4)
  n, lr, c_edit = 3, 1e-2, 0.5
  plain = MEND(model, MENDConfig(rank=8, edit_lr=0.05))
  refined = MEND(model, MENDConfig(rank=8, edit_lr=0.05, refine=n, refine_lr=lr, refine_c_edit=c_edit,
                                   refine_loc_rows=4))  # every pool row at every step
  state = _randomize_net(plain.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(5))
  state = state._replace(aux=plain.update_stats(state.aux, plain.capture(model.params, batch)))
  with pytest.raises(ValueError, match="refine=3 needs a locality pool"):
    refined.edit(state, model.params, batch)
  assert plain.with_loc_pool(state, pool) is state
  edited, _ = plain.jit_edit(state, model.params, batch)
  got, info = refined.jit_edit(refined.with_loc_pool(state, pool), model.params, batch)
  ref_logp = jax.nn.log_softmax(model.logits(model.params, pool))
  mask = pool["attention_mask"].astype(jnp.float32)

  def loss(w):
    p = tree.replace_leaves(model.params, w)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(model.logits(p, pool))), -1)
    return c_edit * losses.nll(model.task, model.logits(p, batch), batch) + jnp.sum(kl * mask) / jnp.sum(mask)

  loss = jax.jit(loss)
  w = tree.get_leaves(edited, model.layer_paths)
  v = {k: jnp.zeros_like(x) for k, x in w.items()}
  loss_edited = float(loss(w))
  grad = jax.jit(jax.grad(loss))
  for _ in range(n):
    g = grad(w)
    v = {k: 0.99 * v[k] + 0.01 * g[k] ** 2 for k in w}
    w = {k: w[k] - lr * g[k] / (jnp.sqrt(v[k]) + 1e-8) for k in w}
  want, edit_only = w, tree.get_leaves(edited, model.layer_paths)
  new = tree.get_leaves(got, model.layer_paths)
  for p in model.layer_paths:
    assert float(jnp.abs(new[p] - edit_only[p]).max()) > 1e-3  # the steps moved the edited matrices
    np.testing.assert_allclose(new[p], want[p], rtol=1e-4, atol=1e-5)
  # The objective fell; info's KL is the final point's, to the unedited model (not to the edit).
  assert float(loss(new)) < loss_edited
  kl_final = float(loss(new) - c_edit * jax.jit(lambda p: losses.nll(model.task, model.logits(p, batch), batch))(got))
  assert kl_final > 1e-4 and abs(float(info["loss_loc"]) - kl_final) <= 1e-4 * kl_final
  np.testing.assert_allclose(info["update_norm"], [np.linalg.norm(np.asarray(new[p] - tree.get_leaves(model.params, [p])[p]))
                                                   for p in model.layer_paths], rtol=1e-4)
  with pytest.raises(ValueError, match="not a low-rank patch"):
    refined.patch(state, model.params, batch)
  with pytest.raises(ValueError, match="EditLog records low-rank patches; this editor refines"):
    EditLog(refined, state)
  with pytest.raises(ValueError, match="refine must be an integer >= 0"):
    MENDConfig(refine=-1)
  with pytest.raises(ValueError, match="refine_loc_rows must be an integer >= 1"):
    MENDConfig(refine=1, refine_loc_rows=0)
  with pytest.raises(ValueError, match="pool has 4 examples, fewer than MENDConfig.refine_loc_rows=5"):
    MEND(model, MENDConfig(rank=8, refine=1, refine_loc_rows=5)).with_loc_pool(state, pool)


def _penalty_reference(moment, count, gamma):
  """P = I + gamma C / (tr C / d), C = moment / count, in float64 (the key-preservation penalty)."""
  c = np.asarray(moment, np.float64) / count
  return np.eye(c.shape[0]) + gamma * c / (np.trace(c) / c.shape[0])


@pytest.mark.parametrize("n", [5, 40])  # the dual form and the primal form
def test_preserving_solve_matches_float64_and_spares_typical_inputs(n):
  rng = np.random.default_rng(20 + n)
  basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
  typical = (rng.normal(size=(300, 16)) * np.geomspace(3.0, 0.05, 16)) @ basis.T  # a few strong directions
  moment = typical.T @ typical
  np.testing.assert_array_equal(capture.key_penalty_root(moment, 300, 0.0), np.eye(16))
  r = capture.key_penalty_root(moment, 300, 4.0)
  p = _penalty_reference(moment, 300, 4.0)
  np.testing.assert_allclose(r.astype(np.float64) @ p @ r, np.eye(16), atol=1e-5)  # R = P^(-1/2)
  u = rng.normal(size=(n, 16)).astype(np.float32)
  d = rng.normal(size=(n, 12)).astype(np.float32)
  u[1] = 0.0  # a masked row takes no part
  for log_lam in (-1.0, 0.5, 3.0):
    lam = np.exp(log_lam)
    want = lam * np.linalg.solve(u.T.astype(np.float64) @ u + lam * p, u.T.astype(np.float64) @ d)
    got = capture.least_squares(u, d, jnp.float32(log_lam), "in_out", precond=jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    got_t = capture.least_squares(u, d, jnp.float32(log_lam), "out_in", precond=jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(got_t), want.T, rtol=2e-4, atol=2e-5 * np.abs(want).max())
  # Against the plain ridge with the same lambda, the typical inputs' outputs change less per unit
  # of change at the keys.
  plain = np.asarray(capture.least_squares(u, d, jnp.float32(1.0), "in_out"), np.float64)
  kept = np.asarray(capture.least_squares(u, d, jnp.float32(1.0), "in_out", precond=jnp.asarray(r)), np.float64)
  ratio = lambda s: np.linalg.norm(typical @ s) / np.linalg.norm(u @ s)
  assert ratio(kept) < 0.7 * ratio(plain)


@pytest.mark.parametrize("rows", ["answer", "all"])
def test_preserving_editor_measures_its_inputs_and_edits_by_its_solve(synth_setup, rows):
  m, data = synth_setup["model"], synth_setup["data"]
  ed = MEND(m, MENDConfig(rank=8, aggregation="least_squares", preserve=2.0, preserve_rows=rows, edit_lr=10.0))
  state = _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(5))
  assert all(np.array_equal(r, np.eye(r.shape[0])) for r in state.aux["preserve"].values())
  prepared = ed.prepare(state, m.params, data, max_rows=6, batch_size=4)  # chunks of 4 and 2
  # Reference: every record's captured input rows one at a time, summed in float64.
  moments = {p: np.zeros((l.d_in, l.d_in)) for p, l in zip(m.layer_paths, m.layers)}
  counts = {p: 0.0 for p in m.layer_paths}
  n_all = 0
  capture = jax.jit(ed.capture, static_argnames="rows")  # one record's capture, compiled once per rows
  for j in range(6):
    n_all += sum(int(np.sum(x)) for x in ed.masks(capture(m.params, data.loc.take([j]), rows="all")).values())
    cap = capture(m.params, data.loc.take([j]), rows=rows)
    masks = ed.masks(cap)
    for p in m.layer_paths:
      x = np.asarray(cap.u[p], np.float64).reshape(-1, moments[p].shape[0])[np.asarray(masks[p]).reshape(-1)]
      moments[p] += x.T @ x
      counts[p] += len(x)
  # "answer": only the positions where the locality answers are read, fewer than all rows.
  assert (sum(counts.values()) < n_all) if rows == "answer" else (sum(counts.values()) == n_all)
  penalties = []
  for i, p in enumerate(m.layer_paths):
    assert counts[p] > 0
    penalties.append(_penalty_reference(moments[p], counts[p], 2.0))
    r = np.asarray(prepared.aux["preserve"][f"layer{i}"], np.float64)
    np.testing.assert_allclose(r @ penalties[i] @ r, np.eye(r.shape[0]), atol=1e-4)
  # The edit: W - alpha lambda (K^T K + lambda P)^-1 K^T D with K, D the editor's pseudo factors.
  batch = data.edit.take([6, 7])
  new, _ = ed.jit_edit(prepared, m.params, batch)
  factors = ed.pseudo_factors(prepared.params["net"], prepared.aux, capture(m.params, batch))
  w0, w1 = tree.get_leaves(m.params, m.layer_paths), tree.get_leaves(new, m.layer_paths)
  for i, layer in enumerate(m.layers):
    k, v = (np.asarray(x, np.float64) for x in factors[layer.path])
    lam = float(np.exp(prepared.params["log_lambda"][i]))
    s = lam * np.linalg.solve(k.T @ k + lam * penalties[i], k.T @ v)
    want = -float(prepared.params["alpha"][i]) * (s if layer.layout == "in_out" else s.T)
    got = np.asarray(w1[layer.path], np.float64) - np.asarray(w0[layer.path], np.float64)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
  # The patch (low-rank factors) gives the same weights.
  patch, _ = jax.jit(ed.patch)(prepared, m.params, batch)
  for p in m.layer_paths:
    left, right = patch[p]
    np.testing.assert_allclose(w0[p] + left @ right, w1[p], rtol=1e-5, atol=1e-6 * float(jnp.abs(w1[p]).max()))
  # Without the term, prepare changes nothing.
  plain = MEND(m, MENDConfig(rank=8, aggregation="least_squares"))
  st = plain.init(jax.random.PRNGKey(0))
  assert plain.prepare(st, m.params, data) is st and "preserve" not in st.aux


def test_protecting_re_measures_the_term_on_the_chosen_facts_and_keeps_them(synth_setup):
  """An editor trained without the term, given one at edit time on two records' locality facts:
  the edited matrices then barely change their outputs at those facts' inputs, relative to other
  facts' inputs, where without the term the two change alike."""
  import dataclasses
  from mend_jax.checkpoint import LoadedEditor
  from mend_jax.data.batches import EditData
  m, data = synth_setup["model"], synth_setup["data"]
  ed = MEND(m, MENDConfig(rank=8, aggregation="least_squares", edit_lr=10.0))
  plain = LoadedEditor(ed, _randomize_net(ed.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(5)), {})
  keep = EditData.from_records(list(data.records[:2]), synth_setup["tok"], 24)
  kept = plain.protecting(m.params, keep, preserve=1e3)
  assert kept.editor.cfg.preserve == 1e3 and kept.editor.cfg == dataclasses.replace(ed.cfg, preserve=1e3)
  assert "preserve" not in plain.state.aux  # the original is unchanged
  assert all(np.abs(np.asarray(r) - np.eye(r.shape[0])).max() > 0.1 for r in kept.state.aux["preserve"].values())
  capture_fn = jax.jit(ed.capture, static_argnames="rows")

  def inputs(view, rows):  # each edited layer's input rows at the locality answers' read positions
    cap = capture_fn(m.params, view.take(rows), rows="answer")
    masks = ed.masks(cap)
    return {p: np.asarray(cap.u[p], np.float64).reshape(-1, l.d_in)[np.asarray(masks[p]).reshape(-1)]
            for p, l in zip(m.layer_paths, m.layers)}

  kept_x, other_x = inputs(keep.loc, [0, 1]), inputs(data.loc, np.arange(10, 20))
  batch = data.edit.take([6, 7])
  w0 = tree.get_leaves(m.params, m.layer_paths)
  ratios = {}
  for name, loaded in (("plain", plain), ("kept", kept)):
    w1 = tree.get_leaves(loaded.edit(m.params, batch)[0], m.layer_paths)
    ratios[name] = []
    for layer in m.layers:
      dw = np.asarray(w1[layer.path], np.float64) - np.asarray(w0[layer.path], np.float64)
      dw = dw if layer.layout == "in_out" else dw.T  # [d_in, d_out]
      change = lambda x: np.mean(np.linalg.norm(x @ dw, axis=1) / np.linalg.norm(x, axis=1))
      ratios[name].append(change(kept_x[layer.path]) / change(other_x[layer.path]))
  assert min(ratios["plain"]) > 0.2  # without the term the kept facts' inputs change like the others
  assert max(ratios["kept"]) < 0.05 * min(ratios["plain"])
  with pytest.raises(ValueError, match="trained without the term, so give one"):
    plain.protecting(m.params, keep)
  with pytest.raises(ValueError, match="must be a number > 0"):
    plain.protecting(m.params, keep, preserve=-1.0)
  summed = MEND(m, MENDConfig(rank=8))
  with pytest.raises(ValueError, match="aggregation='least_squares'"):
    LoadedEditor(summed, summed.init(jax.random.PRNGKey(0)), {}).protecting(m.params, keep, preserve=1.0)


def test_bad_preserve_values_are_clear_errors():
  for bad in (-1.0, True, "1", float("nan")):
    with pytest.raises(ValueError, match="preserve must be a number >= 0"):
      MENDConfig(aggregation="least_squares", preserve=bad)
  with pytest.raises(ValueError, match="aggregation='least_squares'"):
    MENDConfig(preserve=1.0)
  with pytest.raises(ValueError, match="preserve_rows must be one of"):
    MENDConfig(aggregation="least_squares", preserve=1.0, preserve_rows="first")
