"""The training loop on a tiny synthetic world and a tiny GPT-2: resume is exact, a resumed run
restores into shapes instead of allocating the state twice, non-finite steps change nothing,
and the latest and best checkpoints are the ones kept."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax import checkpoint as ckpt_lib
from mend_jax import editors, train

TCFG = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=6, accumulate=2, n_edits=1, n_loc=2, val_every=3,
                         n_val=2, log_every=2, ckpt_every=3, patience=100)


def test_resumed_run_reaches_the_same_state_without_building_it_twice(synth_setup, tmp_path, monkeypatch):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  full, _ = train.fit(ed, TCFG, m.params, d, d, str(tmp_path / "a"))
  # Interrupted after 3 steps (a checkpoint is written there), then the same command again.
  train.fit(ed, dataclasses.replace(TCFG, max_steps=3), m.params, d, d, str(tmp_path / "b"))
  built = []
  real_init = train.init_state
  monkeypatch.setattr(train, "init_state", lambda *a, **k: built.append(1) or real_init(*a, **k))
  resumed, _ = train.fit(ed, TCFG, m.params, d, d, str(tmp_path / "b"))
  assert not built, "a resumed run must restore into the abstract state, not build a concrete one first"
  assert int(resumed.step) == int(full.step) == 6
  chex.assert_trees_all_equal(full, resumed)
  steps = [r["step"] for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl")) if "loss" in r]
  assert steps == [2, 3, 4, 6]  # the redone rows are not logged twice (3: the first run's last step)
  # ... and it really trained: the editor moved away from its initial value.
  init = train.init_state(ed, train.make_optimizer(TCFG, ed), 0)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(init.editor.params),
                                                      jax.tree_util.tree_leaves(full.editor.params)))


def test_non_finite_step_changes_nothing(synth_setup):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  tx = train.make_optimizer(TCFG, ed)
  fault = lambda loss, step: jnp.where(step == 1, jnp.nan, loss)
  step_fn = train.make_train_step(ed, TCFG, fault=fault)
  state = train.init_state(ed, tx, 0)
  state, _ = step_fn(state, m.params, d.sample(0, 0, 1, 2))
  before = jax.device_get(state)
  state, metrics = step_fn(state, m.params, d.sample(0, 1, 1, 2))
  assert float(metrics["skipped"]) == 1.0 and int(state.n_skipped) == 1
  # Everything but the two counters is bit-identical.
  chex.assert_trees_all_equal((before.editor, before.opt_state), (state.editor, state.opt_state))
  assert int(state.step) == int(before.step) + 1
  state, metrics = step_fn(state, m.params, d.sample(0, 2, 1, 2))
  assert float(metrics["skipped"]) == 0.0 and int(state.n_skipped) == 1


def test_one_manager_keeps_the_latest_and_the_best_checkpoint(synth_setup, tmp_path, monkeypatch):
  """Validation losses are forced (through a stand-in `validate`): the best step is 4 and the
  run goes on to 10; the work directory keeps exactly steps 4 and 10, and load_editor takes 4."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  losses_by_step = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: 4.0}
  cfg = dataclasses.replace(TCFG, max_steps=10, val_every=2, ckpt_every=3, accumulate=1)
  seen = []

  def fake_validate(eval_step, editor_state, base_params, data, cfg, mesh=None):
    step = 2 * (len(seen) + 1)
    seen.append(step)
    return {"val/loss": losses_by_step[step], "val/edit_success": 0.0, "val/loc_agree": 1.0}

  monkeypatch.setattr(train, "validate", fake_validate)
  _, summary = train.fit(ed, cfg, m.params, d, d, str(tmp_path))
  assert summary["best_val_loss"] == 1.0 and seen == [2, 4, 6, 8, 10]
  assert sorted(int(x) for x in os.listdir(tmp_path / "checkpoints") if x.isdigit()) == [4, 10]
  assert ckpt_lib.read_meta(str(tmp_path))["step"] == 4
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "val/loss" in r] == [2, 4, 6, 8, 10]


def test_fit_refuses_an_editor_with_nothing_to_train(synth_setup, tmp_path):
  ft = editors.make("ft", synth_setup["model"], {})
  with pytest.raises(ValueError, match="nothing to train"):
    train.fit(ft, TCFG, synth_setup["model"].params, synth_setup["data"], synth_setup["data"], str(tmp_path))
  # Locality examples set aside for a preservation term the editor does not have.
  with pytest.raises(ValueError, match="preserve_share .* has none"):
    train.fit(synth_setup["editor"], dataclasses.replace(TCFG, preserve_share=0.5), synth_setup["model"].params,
              synth_setup["data"], synth_setup["data"], str(tmp_path / "share"))
  assert not os.path.exists(tmp_path / "share")  # refused before anything is written


def test_a_run_that_skips_most_steps_fails_loudly_and_writes_strict_json(synth_setup, tmp_path):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  nan_after_2 = lambda loss, step: jnp.where(step >= 2, jnp.nan, loss)
  with pytest.raises(train.TrainingFailed, match="4 of 6 micro-steps were skipped"):
    train.fit(ed, TCFG, m.params, d, d, str(tmp_path), fault=nan_after_2)
  reject = lambda token: pytest.fail(f"non-strict JSON constant {token}")
  for line in open(tmp_path / "metrics.jsonl"):
    json.loads(line, parse_constant=reject)
  for step in os.listdir(tmp_path / "checkpoints"):
    json.loads(open(tmp_path / "checkpoints" / step / "meta" / "metadata").read(), parse_constant=reject)
  # The rerun of the same command fails the same way (it does not evaluate a broken editor).
  with pytest.raises(train.TrainingFailed):
    train.fit(ed, TCFG, m.params, d, d, str(tmp_path), fault=nan_after_2)


def test_stale_checkpoints_are_removed_when_the_directory_is_opened(synth_setup, tmp_path):
  """A kill between Orbax's save of a new step and its deletion of the old one leaves three
  checkpoints: opening the directory for training keeps only the latest and the best."""
  ed, m = synth_setup["editor"], synth_setup["model"]
  state = train.init_state(ed, train.make_optimizer(TCFG, ed), 0, m.params)
  mngr = ckpt_lib.Checkpoints(str(tmp_path), {})
  mngr.mngr._preservation_policy = ckpt_lib.ocp_managers.LatestN(n=None)  # keeps all: what a kill leaves
  for step, loss in ((2, 1.0), (4, 3.0), (6, None)):
    mngr.save(step, *train._split(state), val_loss=loss)
  mngr.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
  ckpt_lib.Checkpoints(str(tmp_path), {}).close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "6"]  # the best and the latest


@pytest.mark.parametrize("field,value", [("val_every", 0), ("max_steps", 0), ("max_steps", -5), ("n_val", 0),
                                         ("accumulate", 0), ("lr", 0.0), ("kl_positions", "some"),
                                         ("preserve_share", 1.0), ("preserve_share", -0.1)])
def test_train_config_rejects_values_that_would_train_nothing(field, value):
  with pytest.raises(ValueError, match=field):
    train.TrainConfig(**{field: value})


def test_lr_schedules_follow_their_formula(synth_setup):
  """Warm-up then constant or cosine: the Adam step of one leaf, read from the optimizer state's
  schedule count, equals the formula."""
  cfg = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=100, accumulate=1, schedule="cosine", warmup=10)
  sched = train._lr(cfg, 1e-3)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3) and float(sched(100)) == pytest.approx(1e-4)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 45 / 90))
  assert float(sched(55)) == pytest.approx(mid, rel=1e-5)
  const = train._lr(dataclasses.replace(cfg, schedule="constant"), 1e-3)
  assert float(const(3)) == pytest.approx(3e-4) and float(const(50)) == pytest.approx(1e-3)
  assert train._lr(dataclasses.replace(cfg, warmup=0, schedule="constant"), 1e-3) == 1e-3


def test_validation_applies_n_edits_edits_at_once(synth_setup):
  """Validation edits as training does: n_val rounded down to whole batches of n_edits edits,
  each batch with its n_loc locality rows; a split smaller than n_edits is one batch of it all."""
  d = synth_setup["data"]
  seen = []

  def eval_step(editor_state, base_params, batch):
    seen.append((batch["edit"]["input_ids"].shape[0], batch["loc"]["input_ids"].shape[0]))
    return {"loss": jnp.asarray(float(len(seen)))}

  out = train.validate(eval_step, None, None, d, dataclasses.replace(TCFG, n_edits=3, n_val=10, n_loc=2))
  assert seen == [(3, 2)] * 3 and out == {"val/loss": 2.0}
  seen.clear()
  train.validate(eval_step, None, None, d, dataclasses.replace(TCFG, n_edits=len(d) + 5, n_val=4))
  assert seen == [(len(d), TCFG.n_loc)]


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_training_measures_the_preservation_term_once_and_checkpoints_it(synth_setup, tmp_path, share, monkeypatch):
  m, d = synth_setup["model"], synth_setup["data"]
  ed = editors.make("mend", m, {"rank": 8, "aggregation": "least_squares", "preserve": 1.0})
  cfg = dataclasses.replace(TCFG, max_steps=2, val_every=2, ckpt_every=2, preserve_share=share)
  pools = []  # the locality rows each training batch may draw
  sample = type(d).sample
  monkeypatch.setattr(type(d), "sample", lambda self, *a, **kw: pools.append(a[4] if len(a) > 4 else
                                                                             kw.get("loc_pool")) or sample(self, *a, **kw))
  state, _ = train.fit(ed, cfg, m.params, d, d, str(tmp_path))
  assert len(pools) == 2
  for pool in pools:  # with a share, only the other subjects' examples; else all of them
    assert (pool is None) if not share else np.array_equal(pool, d.locality_split(share, 0)[1])
  # With a share, the term is measured on the records whose locality subjects were set aside only.
  measured = d.subset(d.locality_split(share, 0)[0]) if share else d
  want = ed.prepare(ed.init(jax.random.PRNGKey(0)), m.params, measured).aux["preserve"]
  for k, r in want.items():
    assert not np.allclose(r, np.eye(r.shape[0]), atol=1e-3)  # measured, not the identity it starts as
  chex.assert_trees_all_close(state.editor.aux["preserve"], want, rtol=1e-6, atol=1e-7)  # fixed during training
  if share:
    every = ed.prepare(ed.init(jax.random.PRNGKey(0)), m.params, d).aux["preserve"]
    assert max(float(np.abs(every[k] - want[k]).max()) for k in want) > 1e-2  # not all of the split
  loaded = ckpt_lib.load_editor(str(tmp_path), m)
  chex.assert_trees_all_equal(loaded.state.aux["preserve"], state.editor.aux["preserve"])


@pytest.fixture(scope="module")
def trained(synth_setup, tmp_path_factory):
  """The work directory of a summed editor trained for TCFG's 6 micro-steps."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  path = tmp_path_factory.mktemp("trained")
  train.fit(ed, TCFG, m.params, d, d, str(path))
  return path


def test_a_run_started_from_another_editor_takes_its_trained_parameters(synth_setup, trained, tmp_path):
  """train.init_from: a least-squares editor starts from a summed editor's trained networks, alpha
  and statistics; its own log_lambda starts fresh."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  saved = ckpt_lib.load_editor(str(trained), m).state  # its best checkpoint
  init = ed.init(jax.random.PRNGKey(0))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(init.params),
                                                    jax.tree_util.tree_leaves(saved.params))]
  assert any(moved)  # the source really trained
  new = editors.make("mend", m, {"rank": 8, "aggregation": "least_squares"})
  fresh_state = new.init(jax.random.PRNGKey(3))
  warm, fresh = ckpt_lib.warm_start(new, fresh_state, str(trained))
  assert fresh == ["params/log_lambda"]
  chex.assert_trees_all_equal(warm.params["net"], saved.params["net"])
  chex.assert_trees_all_equal(warm.params["alpha"], saved.params["alpha"])
  chex.assert_trees_all_equal(warm.params["log_lambda"], fresh_state.params["log_lambda"])
  chex.assert_trees_all_equal(warm.aux, saved.aux)  # the normalisation statistics with their counts
  # Through the loop: one micro-step of an 8-step accumulation applies no Adam update, so the
  # trained parameters are still the source's.
  cfg = dataclasses.replace(TCFG, max_steps=1, accumulate=8, val_every=1, init_from=str(trained))
  state, _ = train.fit(new, cfg, m.params, d, d, str(tmp_path / "warm"))
  chex.assert_trees_all_equal(state.editor.params["net"], saved.params["net"])  # not the initial ones (moved)


def test_init_from_that_does_not_fit_is_refused_before_anything_is_written(synth_setup, trained, tmp_path):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  ckpt_lib.save_untrained(editors.make("ft", m, {}), m.params, str(tmp_path / "ft"), 0, {})
  out = tmp_path / "out"
  cases = [(ed, str(tmp_path / "missing"), FileNotFoundError, "train.init_from"),
           (ed, str(tmp_path / "ft"), ckpt_lib.CheckpointMismatch, "'ft' editor"),
           (editors.make("mend", m, {"rank": 4}), str(trained), ckpt_lib.CheckpointMismatch, r"shape"),
           (ed, str(out), ValueError, "own --workdir")]
  for editor, path, error, match in cases:
    with pytest.raises(error, match=match):
      train.fit(editor, dataclasses.replace(TCFG, init_from=path), m.params, d, d, str(out))
    assert not out.exists()
  # Other layers, or networks of another layout (`shared`), are refused the same way.
  from conftest import tiny_model
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="train.init_from .* family is 'gpt2', but this run's is"):
    ckpt_lib.check_init_from(str(trained), editors.make("mend", tiny_model("llama"), {"rank": 8}))
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="only .* trained parameters have a counterpart"):
    train.fit(editors.make("mend", m, {"rank": 8, "shared": False}), dataclasses.replace(TCFG, init_from=str(trained)),
              m.params, d, d, str(out))
  assert not out.exists()
  with pytest.raises(ValueError, match="train.init_from"):
    train.TrainConfig(init_from=None)
