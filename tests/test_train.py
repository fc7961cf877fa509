"""Training loop, checkpoints and their failure modes, on a tiny synthetic world and a tiny GPT-2."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from flax import traverse_util

from mend_jax import checkpoint as ckpt_lib
from mend_jax import data as data_lib
from mend_jax import experiment, models, synthetic, train
from mend_jax.editor import EditorConfig
from mend_jax.mend import MEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCFG = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=6, accumulate=2, n_edits=1, n_loc=2, val_every=3,
                         n_val=2, log_every=2, ckpt_every=3, patience=100)


@pytest.fixture(scope="module")
def setup(synth_setup):
  return synth_setup


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_resumed_run_reaches_the_same_state(setup, tmp_path):
  ed, m, d = setup["editor"], setup["model"], setup["data"]
  full, _ = train.fit(ed, TCFG, m.params, d, d, str(tmp_path / "a"), progress=False)
  # Interrupted after 3 steps (a checkpoint is written there), then the same command again.
  import dataclasses

  train.fit(ed, dataclasses.replace(TCFG, max_steps=3), m.params, d, d, str(tmp_path / "b"), progress=False)
  resumed, _ = train.fit(ed, TCFG, m.params, d, d, str(tmp_path / "b"), progress=False)
  assert int(resumed.step) == int(full.step) == 6
  for a, b in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # ... and it really trained: the editor moved away from its initial value.
  init = train.init_state(ed, train.make_optimizer(TCFG), 0)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(init.params), _leaves(full.params)))


def test_non_finite_step_changes_nothing(setup):
  ed, m, d = setup["editor"], setup["model"], setup["data"]
  tx = train.make_optimizer(TCFG)
  fault = lambda loss, step: jnp.where(step == 1, jnp.nan, loss)
  step_fn = train.make_train_step(ed, TCFG, fault=fault)
  state = train.init_state(ed, tx, 0)
  state, _ = step_fn(state, m.params, d.sample(0, 0, 1, 2))
  before = _leaves(state)
  state, metrics = step_fn(state, m.params, d.sample(0, 1, 1, 2))
  after = _leaves(state)
  assert float(metrics["skipped"]) == 1.0 and int(state.n_skipped) == 1
  # Everything but the step counter (index 0) and the skip counter is bit-identical.
  for a, b in list(zip(before, after))[1:-1]:
    np.testing.assert_array_equal(a, b)
  state, metrics = step_fn(state, m.params, d.sample(0, 2, 1, 2))
  assert float(metrics["skipped"]) == 0.0 and int(state.n_skipped) == 1


def test_restored_checkpoint_edits_identically_in_a_fresh_process(setup, tmp_path):
  ed, m, d = setup["editor"], setup["model"], setup["data"]
  wd = tmp_path / "wd"
  train.fit(ed, TCFG, m.params, d, d, str(wd), progress=False)
  m.hf_model.save_pretrained(tmp_path / "model", params=m.params)
  batch = d.edit.take([0])
  np.savez(tmp_path / "batch.npz", **batch)
  loaded = ckpt_lib.load_editor(str(wd), m)
  here, _ = loaded.edit(m.params, batch)
  code = f"""
import numpy as np, jax
from flax import traverse_util
from mend_jax import models, checkpoint
m = models.load_model({str(tmp_path / 'model')!r})
batch = dict(np.load({str(tmp_path / 'batch.npz')!r}))
new, _ = checkpoint.load_editor({str(wd)!r}, m).edit(m.params, batch)
flat = traverse_util.flatten_dict(new, sep="/")
np.savez({str(tmp_path / 'out.npz')!r}, **{{p.replace('/', '|'): np.asarray(flat[p]) for p in m.layer_paths}})
"""
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  there = np.load(tmp_path / "out.npz")
  flat = traverse_util.flatten_dict(here, sep="/")
  base = traverse_util.flatten_dict(m.params, sep="/")
  for p in m.layer_paths:
    assert not np.array_equal(np.asarray(flat[p]), np.asarray(base[p]))
    np.testing.assert_array_equal(there[p.replace("/", "|")], np.asarray(flat[p]))


def test_checkpoint_for_other_layers_or_model_is_refused(setup, tmp_path):
  ed, m, d = setup["editor"], setup["model"], setup["data"]
  wd = tmp_path / "wd"
  train.fit(ed, train.TrainConfig(max_steps=1, val_every=1, n_val=1, accumulate=1), m.params, d, d, str(wd),
            progress=False)
  other = m.with_layers([r"h/1/mlp/c_fc/kernel$"])
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="edits layers"):
    ckpt_lib.load_editor(str(wd), other)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="holds a checkpoint whose layers"):
    train.fit(MEND(other, EditorConfig(rank=8)), TCFG, m.params, d, d, str(wd), progress=False)
  bart = models.model_from_config(tf.BartConfig(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16))
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="made for a 'gpt2' model"):
    ckpt_lib.load_editor(str(wd), bart)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt_lib.load_editor(str(tmp_path / "nothing"), m)
  loaded = ckpt_lib.load_editor(str(wd), m)
  empty = {**d.edit.take([0]), "labels": np.full((1, 24), -100, np.int32)}
  with pytest.raises(ValueError, match="edit target is empty"):
    loaded.edit(m.params, empty)


def test_bad_data_inputs_are_clear_errors(setup):
  tok = setup["tok"]
  with pytest.raises(ValueError, match="target for prompt 'a' is empty"):
    data_lib.encode_pairs(tok, ["a"], [" "], 24)
  with pytest.raises(ValueError, match="longer than max_len=4"):
    data_lib.encode_pairs(tok, ["The capital of X is"], ["Y"], 4)
  rec = dict(setup["data"].records[0])
  del rec["rephrase"]
  with pytest.raises(ValueError, match=r"train\[0\]: missing or empty field\(s\) \['rephrase'\]"):
    data_lib.EditData.from_records([rec], tok, 24, name="train")
  with pytest.raises(FileNotFoundError):
    synthetic.load_records(setup["root"] / "missing.jsonl")
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.lrr'\]"):
    experiment.build_dataclass(train.TrainConfig, {"lrr": 1.0}, "train")


def test_train_script_rejects_unknown_config_key_without_traceback():
  r = subprocess.run([sys.executable, "scripts/train.py", "--workdir", "/tmp/unused", "--config.train.nope=1"],
                     cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  assert "nope" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_matches_a_brute_force_check_when_alpha_is_zero(setup):
  """With alpha = 0 the edited model is the base model, so each metric must equal a direct
  argmax check of the base model, and the drawdown must be exactly 0."""
  from mend_jax import evaluate as eval_lib

  ed, m, d = setup["editor"], setup["model"], setup["data"]
  state = ed.init(jax.random.PRNGKey(0))
  state = state._replace(params={**state.params, "alpha": jnp.zeros_like(state.params["alpha"])})
  n = 6
  res = eval_lib.evaluate(ed, state, m.params, d, n_edits=n, k=1)
  fwd = jax.jit(lambda b: m.logits(m.params, b))

  def success(view):
    hits = []
    for i in range(n):
      row = {k: v for k, v in view.take([i]).items() if not k.startswith("read_")}  # all positions
      pred = np.asarray(fwd(row))[0].argmax(-1)
      lab = row["labels"][0]
      pos = np.nonzero(lab != -100)[0]
      hits.append(all(pred[p - 1] == lab[p] for p in pos))
    return float(np.mean(hits))

  assert res["n_test_edits"] == n
  assert res["edit_success"] == pytest.approx(success(d.equiv))
  assert res["reliability"] == pytest.approx(success(d.edit))
  assert res["locality_acc_pre"] == pytest.approx(success(d.loc))
  assert res["locality_acc_post"] == res["locality_acc_pre"] and res["locality_drawdown"] == 0.0
