"""Baseline editors (FT, FT+KL, ENN, KE) and the editor registry.

Compiled functions are shared between tests through lru-cached builders (the editors' jit_edit is
cached per object), so each (editor, model, batch shape) compiles once per session.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import make_batch, tiny_model
from flax import traverse_util

from mend_jax import algs, losses, models
from mend_jax.algs import AlgState
from mend_jax.baselines import ENN, FT, KE, ENNConfig
from mend_jax.mend import get_leaves, replace_leaves

FAMILIES = ("gpt2", "t5", "bert")
KE_SMALL = {"lstm_hidden": 8, "cond_dim": 12, "cond_hidden": 10}
FT_CFG = {"lr": 1e-2}  # RMSprop (the official optimizer); seeds below are chosen for this lr


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@functools.lru_cache(maxsize=None)
def _alg(name: str, family: str):
  """(editor, state) for a tiny model; FT+KL gets a pool of 6 locality examples."""
  model = tiny_model(family)
  cfg = {"ft": FT_CFG, "ft_kl": {**FT_CFG, "loc_batch_size": 2}, "enn": {}, "ke": KE_SMALL}[name]
  alg = algs.make_alg(name, model, cfg)
  rng = jax.random.PRNGKey(0)
  if name == "ft_kl":
    return alg, alg.init(rng, model.params, loc_pool=make_batch(model, seed=100, batch=6))
  return alg, alg.init(rng, model.params)


def _edit_batch(model, seed=5):
  """An edit batch the model gets wrong (binary: labels flipped from its prediction)."""
  batch = make_batch(model, seed=seed)
  if model.task == "binary":
    pred = (model.logits(model.params, batch) > 0).astype(jnp.int32)
    batch = {**batch, "labels": 1 - pred}
  return batch


# ---------------------------------------------------------------- registry
def test_registry_builds_every_alg_and_rejects_bad_names_and_keys():
  model = tiny_model("gpt2")
  assert algs.ALGS == ("mend", "ft", "ft_kl", "enn", "ke")
  types = {"ft": FT, "ft_kl": FT, "enn": ENN, "ke": KE}
  for name, cls in types.items():
    alg = algs.make_alg(name, model, {})
    assert isinstance(alg, cls) and alg.name == name and alg.model is model
    assert isinstance(alg, algs.EditorAlg)
    assert alg.learned == (name in ("enn", "ke"))
    assert getattr(alg, "needs_loc_pool", False) == (name == "ft_kl")
  from mend_jax.mend import MEND

  assert isinstance(algs.make_alg("mend", model, {"rank": 4}), MEND)
  with pytest.raises(ValueError, match="unknown editor 'rome'"):
    algs.make_alg("rome", model, {})
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['ft.c_edit'\]"):
    algs.make_alg("ft", model, {"c_edit": 0.1})  # only FT+KL has an edit weight
  with pytest.raises(ValueError, match="ranq"):
    algs.make_alg("mend", model, {"ranq": 4})
  with pytest.raises(ValueError, match="opt"):
    algs.make_alg("ft", model, {"opt": "lbfgs"})
  with pytest.raises(ValueError, match="loc_ref"):
    algs.make_alg("enn", model, {"loc_ref": "theta"})
  with pytest.raises(TypeError, match="not learned"):
    algs.make_alg("ft", model).loss({}, {}, model.params, {})
  with pytest.raises(ValueError, match="locality pool"):
    alg = algs.make_alg("ft_kl", model)
    alg.edit(alg.init(jax.random.PRNGKey(0), model.params), model.params, make_batch(model))
  with pytest.raises(ValueError, match="missing"):
    alg.with_loc_pool(alg.init(jax.random.PRNGKey(0), model.params), {"input_ids": jnp.zeros((4, 3), jnp.int32)})


# ---------------------------------------------------------------- FT / FT+KL
def _brute_force_ft(alg, state, params, batch):
  """The same updates as FT's while_loop, one jitted step per Python iteration."""
  w = {p: k.astype(jnp.float32) for p, k in get_leaves(params, alg.model.layer_paths).items()}
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
  alg, state = _alg("ft", "gpt2")
  batch = _edit_batch(model, seed=5)
  new, info = alg.jit_edit(state, model.params, batch)
  n_ref, w_ref, done_ref = _brute_force_ft(alg, state, model.params, batch)
  assert done_ref and 1 < n_ref < alg.cfg.max_steps
  assert int(info["n_steps"]) == n_ref and float(info["success"]) == 1.0
  assert float(jnp.min(losses.exact_match(model.task, model.logits(new, batch), batch))) == 1.0
  np.testing.assert_allclose(info["loss_before"], losses.nll(model.task, model.logits(model.params, batch), batch),
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
                                        jnp.pad(jnp.argmax(model.logits(model.params, batch), -1)[:, :-1], ((0, 0), (1, 0))),
                                        -100)}
  same, info = alg.jit_edit(state, model.params, right)
  assert int(info["n_steps"]) == 0 and float(info["success"]) == 1.0
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(same),
                                                                         jax.tree_util.tree_leaves(model.params)))


def test_ft_kl_objective_includes_the_kl_and_changes_the_trajectory():
  model = tiny_model("gpt2")
  alg, state = _alg("ft_kl", "gpt2")
  ft, ft_state = _alg("ft", "gpt2")
  batch = _edit_batch(model, seed=5)
  w0 = get_leaves(model.params, model.layer_paths)
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
  base = traverse_util.unflatten_dict(flat, sep="/")
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
      return {**p, "theta": traverse_util.unflatten_dict(flat, sep="/")}
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
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b)
  moved = _flat(params["theta"])
  for path in (model.layer_paths[0], "transformer/wte/embedding", "transformer/h/0/attn/c_attn/kernel"):
    assert not np.array_equal(np.asarray(moved[path]), _flat(saved)[path]), path
  assert not np.allclose(np.asarray(params["lr"]), 0.5)
  assert enn.pre_edit_params(AlgState(params, state.aux), base) is params["theta"]


# ---------------------------------------------------------------- KE
def test_ke_edit_is_the_gated_masked_gradient_plus_offset():
  model = tiny_model("gpt2")
  alg, state = _alg("ke", "gpt2")
  batch = _edit_batch(model, seed=5)
  emb = "transformer/wte/embedding"
  np.testing.assert_array_equal(np.asarray(state.params["net"]["embed"]["embedding"]),
                                np.asarray(_flat(model.params)[emb]))
  # Host-side init: torch's defaults; weight norm starts at the identity reparametrisation.
  net = state.params["net"]
  wn = net["layer0"]["out"]
  np.testing.assert_allclose(wn["scale"], np.linalg.norm(np.asarray(wn["kernel"]), axis=0), rtol=1e-6)
  lstm = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(net["lstm_fwd"])])
  assert np.abs(lstm).max() <= 1 / KE_SMALL["lstm_hidden"] ** 0.5 and lstm.std() > 0.1
  new, info = alg.jit_edit(state, model.params, batch)
  facs = jax.jit(alg.factors)(state.params["net"], batch)

  # Edit b's own fine-tuning gradient: the token-mean NLL with only b's labels scored.
  @jax.jit
  def example_grad(b):
    keep = (jnp.arange(batch["labels"].shape[0]) == b)[:, None]
    lb = {**batch, "labels": jnp.where(keep, batch["labels"], -100)}
    w = get_leaves(model.params, model.layer_paths)
    return jax.grad(lambda w: losses.nll(model.task, model.logits(replace_leaves(model.params, w), lb), lb))(w)

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
  assert jax.tree_util.tree_structure(traced) == jax.tree_util.tree_structure(state)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(state)))


# ---------------------------------------------------------------- every editor, three families
@pytest.mark.parametrize("family", FAMILIES)
def test_every_editor_changes_exactly_the_editable_layers(family):
  """Jitted edits on a causal LM, a seq2seq model and a classifier: finite, and exactly the
  editable matrices change, the same set as MEND's edit (compared on gpt2; MEND's own tests cover
  the other families)."""
  model = tiny_model(family)
  batch = _edit_batch(model, seed=5)
  before = _flat(model.params)

  def changed_paths(new):
    after = _flat(new)
    assert set(after) == set(before)
    return {p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}

  if family == "gpt2":
    mend = algs.make_alg("mend", model, {"rank": 4})
    assert changed_paths(mend.jit_edit(mend.init(jax.random.PRNGKey(0)), model.params, batch)[0]) == set(
        model.layer_paths)
  # Plain FT runs on gpt2 only: FT+KL runs the same loop with its objective plus the KL term.
  for name in ("ft", "ft_kl", "enn", "ke") if family == "gpt2" else ("ft_kl", "enn", "ke"):
    alg, state = _alg(name, family)
    new, info = alg.jit_edit(state, alg.pre_edit_params(state, model.params), batch)
    changed = changed_paths(new)
    assert changed == set(model.layer_paths), (name, sorted(changed ^ set(model.layer_paths)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves((new, info))), name
    assert info["update_norm"].shape == (len(model.layers),), name
    after = _flat(new)
    assert all(after[p].dtype == before[p].dtype for p in before), name


def test_jit_edit_equals_jitting_edit_and_shares_the_unedited_arrays():
  """algs.jit_edit returns only the edited leaves from the program: its result must equal
  jax.jit(alg.edit) bit for bit, its other leaves must be the start model's own arrays, and with
  from_base it must start from pre_edit_params (ENN: a theta made to differ from the base)."""
  model = tiny_model("gpt2")
  batch = _edit_batch(model, seed=5)
  mend = algs.make_alg("mend", model, {"rank": 4})
  enn, enn_state = _alg("enn", "gpt2")
  theta = jax.tree_util.tree_map(lambda x: x * 1.01, enn_state.params["theta"])
  cases = [(mend, mend.init(jax.random.PRNGKey(0))), (enn, AlgState({**enn_state.params, "theta": theta}, {})),
           _alg("ke", "gpt2")]
  for alg, state in cases:
    start = alg.pre_edit_params(state, model.params)
    ref, ref_info = jax.jit(alg.edit)(state, start, batch)
    for new, info, origin in ((*algs.jit_edit(alg)(state, start, batch), start),
                              (*algs.jit_edit(alg, from_base=True)(state, model.params, batch), start)):
      got, want, orig = _flat(new), _flat(ref), _flat(origin)
      assert set(got) == set(want), alg.name
      for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=f"{alg.name} {path}")
        if path not in model.layer_paths:
          assert got[path] is orig[path], (alg.name, path)
      for key in ref_info:
        np.testing.assert_array_equal(np.asarray(info[key]), np.asarray(ref_info[key]), err_msg=f"{alg.name} {key}")
