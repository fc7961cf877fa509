"""Checkpoints: every editor goes through train -> save -> load_editor -> the same edit ->
evaluation; a restored editor edits identically in a fresh process; checkpoints made for other
layers or another model family are refused."""

import dataclasses
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import transformers as tf

from mend_jax import checkpoint as ckpt_lib
from mend_jax import editors, models, train, tree
from mend_jax import evaluate as eval_lib
from mend_jax.editors import MEND, MENDConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCFG = train.TrainConfig(lr=1e-3, lr_lr=1e-3, max_steps=2, accumulate=1, n_edits=1, n_loc=2, val_every=2,
                         n_val=2, log_every=1, ckpt_every=2, patience=100)
def test_enn_save_restore_edit_evaluate(synth_setup, tmp_path):
  """ENN's checkpoint holds the model it trained: restored, it edits exactly like the live state,
  evaluates, and the frozen original stays untouched. (MEND's round trip is the fresh-process
  test below; every editor's runs through train -> checkpoint -> evaluation in
  tests/test_experiment.py.)"""
  m, d = synth_setup["model"], synth_setup["data"]
  base_copy = jax.device_get(m.params)
  editor = editors.make("enn", m, {})
  state, summary = train.fit(editor, TCFG, m.params, d, d, str(tmp_path))
  assert summary["steps"] == 2 and int(state.n_skipped) == 0
  live = state.editor
  loaded = ckpt_lib.load_editor(str(tmp_path), m)
  assert loaded.editor.name == "enn" and type(loaded.editor) is type(editor)
  batch = d.edit.take(np.array([0]))
  chex.assert_trees_all_equal(jax.jit(editor.edit)(live, editor.pre_edit_params(live, m.params), batch),
                              loaded.edit(m.params, batch))
  res = eval_lib.evaluate(loaded.editor, loaded.state, m.params, d, n_edits=2, k=1)
  for key in ("edit_success", "reliability", "locality_drawdown", "time_per_edit_s"):
    assert np.isfinite(res[key]), key
  chex.assert_trees_all_equal(base_copy, m.params)  # ENN trains its own copy
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


def test_a_restored_editor_applies_itself_several_times_per_edit(synth_setup, tmp_path):
  """with_edit_steps(2): the trained editor's edit applied to the weights its first edit left."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  train.fit(ed, TCFG, m.params, d, d, str(tmp_path))
  loaded = ckpt_lib.load_editor(str(tmp_path), m)
  batch = d.edit.take([0, 1])
  once, _ = loaded.edit(m.params, batch)
  by_hand, _ = loaded.edit(once, batch)
  twice, _ = loaded.with_edit_steps(2).edit(m.params, batch)
  w0, w1, w2, w = (tree.get_leaves(t, m.layer_paths) for t in (m.params, once, by_hand, twice))
  for p in m.layer_paths:
    assert not np.array_equal(np.asarray(w2[p]), np.asarray(w1[p]))
    np.testing.assert_allclose(w[p], w2[p], rtol=1e-6, atol=1e-6 * float(np.abs(w2[p] - w0[p]).max()))
  assert loaded.with_edit_steps(0) is loaded and loaded.editor.cfg.edit_steps == 1
  with pytest.raises(ValueError, match="edit_steps must be an integer >= 0"):
    loaded.with_edit_steps(-1)
  ft = ckpt_lib.LoadedEditor(editors.make("ft", m, {}), None, {})
  with pytest.raises(ValueError, match="edit_steps applies to MEND editors; this one is 'ft'"):
    ft.with_edit_steps(2)
  # with_refine(n, pool): the same edit, then n FT+KL steps that move the edited matrices.
  few_rows = dataclasses.replace(loaded, editor=editors.make("mend", m, dataclasses.replace(loaded.editor.cfg,
                                                                                           refine_loc_rows=4)))
  refined = few_rows.with_refine(2, d.loc.take(np.arange(8)))
  assert refined.editor.cfg.refine == 2 and loaded.with_refine(0) is loaded
  tuned, _ = refined.edit(m.params, batch)
  wr = tree.get_leaves(tuned, m.layer_paths)
  assert all(not np.array_equal(np.asarray(wr[p]), np.asarray(w1[p])) for p in m.layer_paths)
  with pytest.raises(ValueError, match="refine=2 needs a locality pool"):
    few_rows.with_refine(2).edit(m.params, batch)
  with pytest.raises(ValueError, match="refine must be an integer >= 0"):
    loaded.with_refine(-1)
  with pytest.raises(ValueError, match="refine applies to MEND editors; this one is 'ft'"):
    ft.with_refine(2)


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


def _steps(workdir):
  return {p: os.path.getmtime(os.path.join(workdir, "checkpoints", p))
          for p in os.listdir(os.path.join(workdir, "checkpoints"))}


def test_a_run_of_another_editor_or_base_model_is_refused_before_writing(synth_setup, tmp_path, caplog):
  """FT saved over a trained MEND directory, or MEND resumed on a same-shape model with other
  weights: refused, nothing changed on disk. load_editor on the other model works, with a warning
  naming both models."""
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  wd = str(tmp_path / "wd")
  train.fit(ed, TCFG, m.params, d, d, wd)
  open(os.path.join(wd, "results.json"), "w").write('{"edit_success": 0.5}')
  before = _steps(wd)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="holds a checkpoint whose alg is 'mend', but this run's is 'ft'"):
    ckpt_lib.save_untrained(editors.make("ft", m, {}), m.params, wd, 0, {"config": {}})
  other = models.model_from_config(m.config, seed=1)  # same family and shapes, other weights
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="whose model is .* weights"):
    train.fit(MEND(other, MENDConfig(rank=8)), TCFG, other.params, d, d, wd)
  assert _steps(wd) == before and open(os.path.join(wd, "results.json")).read() == '{"edit_success": 0.5}'
  with caplog.at_level("WARNING"):
    loaded = ckpt_lib.load_editor(wd, other)
  assert "was trained on model" in caplog.text and "applying it to model" in caplog.text
  assert loaded.editor.name == "mend"
  with pytest.raises(ValueError, match="is a file; expected a directory"):
    ckpt_lib.check_workdir(os.path.join(wd, "results.json"), {})


def _array_files(workdir, item="editor"):
  out = []
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    if f"{os.sep}{item}{os.sep}d" in root + os.sep:
      out += [os.path.join(root, f) for f in files]
  return out


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_meta", "missing_item"])
def test_a_damaged_checkpoint_is_one_clear_error(damage, synth_setup, tmp_path):
  ed, m, d = synth_setup["editor"], synth_setup["model"], synth_setup["data"]
  wd = str(tmp_path / "wd")
  train.fit(ed, TCFG, m.params, d, d, wd)
  step_dir = os.path.join(wd, "checkpoints", max(os.listdir(os.path.join(wd, "checkpoints"))))
  if damage == "flip":
    path = max(_array_files(wd), key=os.path.getsize)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
  elif damage == "truncate":
    path = max(_array_files(wd), key=os.path.getsize)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 3])
  elif damage == "missing_meta":
    shutil.rmtree(os.path.join(step_dir, "meta"))
  else:
    shutil.rmtree(os.path.join(step_dir, "editor"))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.load_editor(wd, m)
  msg = str(e.value)
  assert "checkpoints" in msg and "\n" not in msg, msg
  with pytest.raises(ckpt_lib.CheckpointError):  # resuming reads the same checkpoint
    train.fit(ed, dataclasses.replace(TCFG, max_steps=4), m.params, d, d, wd)


def test_a_field_added_to_an_editor_config_keeps_old_checkpoints_usable():
  """A checkpoint stored before a config field existed (here: without identity_init) matches a run
  whose field is at its default, and not one that sets it otherwise."""
  from mend_jax.editors import MENDConfig

  run = {"alg": "mend", "editor_config": dataclasses.asdict(MENDConfig()), "family": "gpt2", "layers": [],
         "model": {"config": "c", "weights": "w"}}
  old = {**run, "editor_config": {k: v for k, v in run["editor_config"].items() if k != "identity_init"}}
  ckpt_lib.check_run(old, run, "wd")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="editor_config"):
    ckpt_lib.check_run(old, {**run, "editor_config": {**run["editor_config"], "identity_init": False}}, "wd")
