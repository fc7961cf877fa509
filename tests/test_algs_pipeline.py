"""Every algorithm through the same pipeline: train (learned ones) -> Orbax checkpoint ->
load_editor -> the same edits -> evaluation; the frozen original stays bit-identical."""



import jax
import numpy as np
import pytest

from mend_jax import algs, train
from mend_jax import checkpoint as ckpt_lib
from mend_jax import evaluate as eval_lib
from mend_jax import experiment

TCFG = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=2, accumulate=1, n_edits=1, n_loc=2, val_every=2,
                         n_val=2, log_every=1, ckpt_every=2, patience=100)
CFGS = {"enn": {}, "ke": {"lstm_hidden": 8, "cond_dim": 8, "cond_hidden": 8},
        "ft_kl": {"lr": 1e-2, "max_steps": 3, "loc_batch_size": 2}}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name", sorted(CFGS))
def test_train_save_restore_edit_evaluate(name, synth_setup, tmp_path):
  m, d = synth_setup["model"], synth_setup["data"]
  base = m.params
  base_copy = _leaves(base)
  editor = algs.make_alg(name, m, CFGS[name])
  workdir = str(tmp_path / name)
  if editor.learned:
    state, summary = train.fit(editor, TCFG, base, d, d, workdir, progress=False)
    assert summary["steps"] == 2 and int(state.n_skipped) == 0
    live = algs.AlgState(state.params, state.aux)
  else:
    summary = ckpt_lib.save_untrained(editor, base, workdir, 0, {"config": {}})
    live = jax.jit(editor.init)(jax.random.PRNGKey(0), base)
  loaded = ckpt_lib.load_editor(workdir, m)
  assert loaded.alg.name == name and type(loaded.alg) is type(editor)
  live = experiment.with_loc_pool(editor, live, d)
  loaded.state = experiment.with_loc_pool(loaded.alg, loaded.state, d)
  batch = d.edit.take(np.array([0]))
  # The restored editor edits exactly like the one that was trained (ENN: from its trained model).
  ref, _ = jax.jit(editor.edit)(live, editor.pre_edit_params(live, base), batch)
  got, info = loaded.edit(base, batch)
  for a, b in zip(_leaves(ref), _leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(np.asarray(info["update_norm"])))
  res = eval_lib.evaluate(loaded.alg, loaded.state, base, d, n_edits=2, k=1)
  for key in ("edit_success", "reliability", "locality_drawdown", "time_per_edit_s"):
    assert np.isfinite(res[key]), key
  # The original model is never trained (ENN trains its own copy).
  for a, b in zip(base_copy, _leaves(base)):
    np.testing.assert_array_equal(a, b)
  if name == "enn":
    assert any(not np.array_equal(a, b) for a, b in zip(base_copy, _leaves(live.params["theta"])))


def test_experiment_config_names_the_algorithm(synth_setup):
  import ml_collections

  m = synth_setup["model"]
  cfg = ml_collections.ConfigDict({"alg": "ke", "editor": {}, "ke": CFGS["ke"]})
  assert experiment.make_editor(cfg, m).name == "ke"
  with pytest.raises(ValueError, match="config.alg must be one of"):
    experiment.make_editor(ml_collections.ConfigDict({"alg": "rome", "editor": {}}), m)
  with pytest.raises(ValueError, match="unknown config key"):
    experiment.make_editor(ml_collections.ConfigDict({"alg": "enn", "editor": {}, "enn": {"lrr": 1}}), m)

