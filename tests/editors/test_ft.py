"""FT and FT+KL: the jitted loop equals a Python loop, stops on success, and FT+KL's objective
includes the KL on a fresh locality sample per step."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import editor_setup, jit_logits, make_batch, tiny_model, wrong_batch
from mend_jax import losses, tree

_flat = tree.flatten


# ---------------------------------------------------------------- FT / FT+KL
def _brute_force_ft(alg, state, params, batch):
  """The same updates as FT's while_loop, one jitted step per Python iteration."""
  w = {p: k.astype(jnp.float32) for p, k in tree.get_leaves(params, alg.model.layer_paths).items()}
  opt = alg.tx.init(w)

  @jax.jit
  def step(w, opt, i):
    (_, (_, _, success)), g = jax.value_and_grad(alg.objective, has_aux=True)(w, params, state.aux, batch, i)
    upd, opt = alg.tx.update(g, opt, w)
    return optax.apply_updates(w, upd), opt, jnp.all(success > 0.5)

  for i in range(alg.cfg.max_steps + 1):
    new_w, new_opt, done = step(w, opt, i)
    if bool(done) or i == alg.cfg.max_steps:
      return i, w, bool(done)
    w, opt = new_w, new_opt


def test_ft_loop_stops_when_the_edit_succeeds_and_matches_a_python_loop():
  model = tiny_model("gpt2")
  alg, state = editor_setup("ft", "gpt2")
  batch = wrong_batch(model, seed=5)
  new, info = alg.jit_edit(state, model.params, batch)
  n_ref, w_ref, done_ref = _brute_force_ft(alg, state, model.params, batch)
  assert done_ref and 1 < n_ref < alg.cfg.max_steps
  assert int(info["n_steps"]) == n_ref and float(info["success"]) == 1.0
  assert float(jnp.min(losses.exact_match(model.task, jit_logits(model)(new, batch), batch))) == 1.0
  np.testing.assert_allclose(info["loss_before"], losses.nll(model.task, jit_logits(model)(model.params, batch), batch),
                             rtol=1e-6)
  before, after = _flat(model.params), _flat(new)
  for path, w in before.items():
    if path in model.layer_paths:
      np.testing.assert_allclose(after[path], w_ref[path], rtol=1e-4, atol=1e-5)
      assert not np.array_equal(np.asarray(after[path]), np.asarray(w)), path
    else:
      np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(w), err_msg=path)
  # A batch this tiny model cannot fit (found by search) runs exactly max_steps updates.
  _, info = alg.jit_edit(state, model.params, make_batch(model, seed=1))
  assert int(info["n_steps"]) == alg.cfg.max_steps and float(info["success"]) == 0.0
  # Already right: no step at all, params unchanged.
  right = {**batch, "labels": jnp.where(batch["labels"] != -100,
                                        jnp.pad(jnp.argmax(jit_logits(model)(model.params, batch), -1)[:, :-1], ((0, 0), (1, 0))),
                                        -100)}
  same, info = alg.jit_edit(state, model.params, right)
  assert int(info["n_steps"]) == 0 and float(info["success"]) == 1.0
  chex.assert_trees_all_equal(same, model.params)


def test_ft_kl_objective_includes_the_kl_and_changes_the_trajectory():
  model = tiny_model("gpt2")
  alg, state = editor_setup("ft_kl", "gpt2")
  ft, ft_state = editor_setup("ft", "gpt2")
  batch = wrong_batch(model, seed=5)
  w0 = tree.get_leaves(model.params, model.layer_paths)
  loss, (l_edit, l_loc, _) = alg.objective(w0, model.params, state.aux, batch, 0)
  assert float(l_loc) == 0.0  # params equal the start: p_start == p_current
  assert float(loss) == pytest.approx(alg.cfg.c_edit * float(l_edit))
  w1 = {p: w + 0.05 * jax.random.normal(jax.random.PRNGKey(i), w.shape) for i, (p, w) in enumerate(w0.items())}
  loss, (l_edit, l_loc, _) = alg.objective(w1, model.params, state.aux, batch, 0)
  assert float(l_loc) > 1e-6
  np.testing.assert_allclose(loss, alg.cfg.c_edit * l_edit + l_loc, rtol=1e-6)
  # A fresh locality sample per step: the steps of one edit read different pool rows.
  rows = {tuple(np.asarray(alg._loc_sample(state.aux, batch, i)["input_ids"][:, 0])) for i in range(6)}
  assert len(rows) > 1
  # Same optimizer and lr as FT, different objective: a different edit.
  new_kl, info_kl = alg.jit_edit(state, model.params, batch)
  new_ft, _ = ft.jit_edit(ft_state, model.params, batch)
  assert float(info_kl["loss_loc"]) > 0
  path = model.layer_paths[0]
  assert not np.allclose(_flat(new_kl)[path], _flat(new_ft)[path])
