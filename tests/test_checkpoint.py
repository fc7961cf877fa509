"""Checkpoints: every editor goes through train -> save -> load_editor -> the same edit ->
evaluation; a restored editor edits identically in a fresh process; checkpoints made for other
layers or another model family are refused."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import transformers as tf

from mend_jax import checkpoint as ckpt_lib
from mend_jax import editors, experiment, models, train, tree
from mend_jax import evaluate as eval_lib
from mend_jax.editors import MEND, MENDConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCFG = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=2, accumulate=1, n_edits=1, n_loc=2, val_every=2,
                         n_val=2, log_every=1, ckpt_every=2, patience=100)
# MEND's round trip is test_restored_checkpoint_edits_identically_in_a_fresh_process below.
CFGS = {"enn": {}, "ke": {"lstm_hidden": 8, "cond_dim": 8, "cond_hidden": 8},
        "ft_kl": {"lr": 1e-2, "max_steps": 3, "loc_batch_size": 2}}


@pytest.mark.parametrize("name", sorted(CFGS))
def test_train_save_restore_edit_evaluate(name, synth_setup, tmp_path):
  m, d = synth_setup["model"], synth_setup["data"]
  base = m.params
  base_copy = jax.device_get(base)
  editor = editors.make(name, m, CFGS[name])
  workdir = str(tmp_path / name)
  if editor.learned:
    state, summary = train.fit(editor, TCFG, base, d, d, workdir)
    assert summary["steps"] == 2 and int(state.n_skipped) == 0
    live = state.editor
  else:
    ckpt_lib.save_untrained(editor, base, workdir, 0, {"config": {}})
    live = jax.jit(editor.init)(jax.random.PRNGKey(0), base)
  loaded = ckpt_lib.load_editor(workdir, m)
  assert loaded.editor.name == name and type(loaded.editor) is type(editor)
  pool = experiment.loc_pool(d)
  live, loaded = editor.with_loc_pool(live, pool), loaded.with_loc_pool(pool)
  batch = d.edit.take(np.array([0]))
  # The restored editor edits exactly like the one that was trained (ENN: from its trained model).
  ref = jax.jit(editor.edit)(live, editor.pre_edit_params(live, base), batch)
  got = loaded.edit(base, batch)
  chex.assert_trees_all_equal(ref, got)
  res = eval_lib.evaluate(loaded.editor, loaded.state, base, d, n_edits=2, k=1)
  for key in ("edit_success", "reliability", "locality_drawdown", "time_per_edit_s"):
    assert np.isfinite(res[key]), key
  # The original model is never trained (ENN trains its own copy).
  chex.assert_trees_all_equal(base_copy, base)
  if name == "enn":
    assert not np.array_equal(tree.flatten(base_copy)[m.layer_paths[0]],
                              tree.flatten(live.params["theta"])[m.layer_paths[0]])


def test_restored_checkpoint_edits_identically_in_a_fresh_process(synth_setup, tmp_path):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  wd = tmp_path / "wd"
  train.fit(ed, TCFG, m.params, d, d, str(wd))
  m.hf_model.save_pretrained(tmp_path / "model", params=m.params)
  batch = d.edit.take([0])
  np.savez(tmp_path / "batch.npz", **batch)
  here, _ = ckpt_lib.load_editor(str(wd), m).edit(m.params, batch)
  code = f"""
import numpy as np
from mend_jax import checkpoint, models, tree
m = models.load_model({str(tmp_path / 'model')!r})
batch = dict(np.load({str(tmp_path / 'batch.npz')!r}))
new, _ = checkpoint.load_editor({str(wd)!r}, m).edit(m.params, batch)
flat = tree.flatten(new)
np.savez({str(tmp_path / 'out.npz')!r}, **{{p.replace('/', '|'): np.asarray(flat[p]) for p in m.layer_paths}})
"""
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  there = np.load(tmp_path / "out.npz")
  flat, base = tree.flatten(here), tree.flatten(m.params)
  for p in m.layer_paths:
    assert not np.array_equal(np.asarray(flat[p]), np.asarray(base[p]))
    np.testing.assert_array_equal(there[p.replace("/", "|")], np.asarray(flat[p]))


def test_checkpoint_for_other_layers_or_model_is_refused(synth_setup, tmp_path):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  wd = tmp_path / "wd"
  train.fit(ed, train.TrainConfig(max_steps=1, val_every=1, n_val=1, accumulate=1), m.params, d, d, str(wd))
  other = m.with_layers([r"h/1/mlp/c_fc/kernel$"])
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="edits layers"):
    ckpt_lib.load_editor(str(wd), other)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="holds a checkpoint whose layers"):
    train.fit(MEND(other, MENDConfig(rank=8)), TCFG, m.params, d, d, str(wd))
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
