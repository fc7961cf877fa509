"""The edit log: a patch reproduces MEND's edit; apply then revert gives back the weights
(bit-identical for the last edit, within a stated tolerance for an earlier one); the adapter
reproduces the patched weights; a saved log restores in a fresh process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mend_jax import tree
from mend_jax.edit_log import EditLog
from mend_jax.editors import MEND, MENDConfig

from conftest import make_batch, tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def _setup(aggregation="sum"):
  model = tiny_model("gpt2")
  ed = MEND(model, MENDConfig(rank=8, aggregation=aggregation, edit_lr=1e-2))
  state = ed.init(jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten(state.params["net"])
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  net = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, ed, state._replace(params={**state.params, "net": net})


@pytest.mark.parametrize("aggregation", ["sum", "least_squares", "malmen"])
def test_a_patch_is_the_edit(aggregation):
  model, ed, state = _setup(aggregation)
  batch = make_batch(model, seed=1, batch=2)
  edited, _ = ed.jit_edit(state, model.params, batch)
  log = EditLog(ed, state)
  patched = log.apply(model.params, batch, prompts=["p0", "p1"], targets=["t0", "t1"])
  for p in model.layer_paths:
    want = np.asarray(tree.flatten(edited)[p])
    np.testing.assert_allclose(np.asarray(tree.flatten(patched)[p]), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  row = log.list()[0]
  assert row["id"] == 0 and row["prompts"] == ["p0", "p1"] and row["rank"] > 0 and min(row["norms"].values()) > 0


def test_revert_gives_back_the_weights_and_the_adapter_reproduces_them(tmp_path):
  model, ed, state = _setup()
  log = EditLog(ed, state)
  params = model.params
  for i in range(3):
    params = log.apply(params, make_batch(model, seed=10 + i, batch=1), prompts=[f"p{i}"], targets=[f"t{i}"])
  base = tree.get_leaves(model.params, model.layer_paths)
  # The adapter: base + A @ B equals the weights with all three edits (float32 sums).
  for p, (a, b) in log.adapter().items():
    got = np.asarray(base[p], np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(np.asarray(tree.flatten(params)[p]), got, atol=1e-6)
  # The middle edit: to float32 precision, with the error reported (and below the tolerance).
  without_1, err = log.revert(params, 1)
  assert 0 < err < 1e-6 and [r["id"] for r in log.list()] == [0, 2]
  ref = log._reference()
  for p in model.layer_paths:
    np.testing.assert_allclose(np.asarray(tree.flatten(without_1)[p], np.float64), ref[p], atol=1e-6)
  # The last edit: bit-identical to the weights before it.
  params = log.apply(without_1, make_batch(model, seed=20, batch=1))
  back, err = log.revert(params, 3)
  assert err == 0.0
  for p in model.layer_paths:
    np.testing.assert_array_equal(np.asarray(tree.flatten(back)[p]), np.asarray(tree.flatten(without_1)[p]))
  with pytest.raises(KeyError, match="no edit 7 in this log"):
    log.revert(back, 7)


def test_a_saved_log_restores_in_a_fresh_process(tmp_path):
  model, ed, state = _setup()
  log = EditLog(ed, state)
  params = log.apply(model.params, make_batch(model, seed=4, batch=1), prompts=["France"], targets=["Lyon"])
  params = log.apply(params, make_batch(model, seed=5, batch=1), prompts=["Japan"], targets=["won"])
  log.save(str(tmp_path / "log"))
  assert sorted(os.listdir(tmp_path)) == ["log"]  # no temporary directory left
  code = f"""
import sys, json, jax, numpy as np
sys.path.insert(0, {HERE!r})
from conftest import tiny_model
from mend_jax.edit_log import EditLog
from mend_jax.editors import MEND, MENDConfig
model = tiny_model("gpt2")
ed = MEND(model, MENDConfig(rank=8, edit_lr=1e-2))
log = EditLog.load({str(tmp_path / "log")!r}, ed, ed.init(jax.random.PRNGKey(0)))
a = log.adapter()
print(json.dumps({{"list": log.list(), "sums": {{p: float(np.sum(x @ y)) for p, (x, y) in a.items()}}}}))
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["prompts"] for r in got["list"]] == [["France"], ["Japan"]]
  assert got["list"] == json.loads(json.dumps(log.list()))
  for p, (a, b) in log.adapter().items():
    assert got["sums"][p] == pytest.approx(float(np.sum(a @ b)), rel=1e-6)
