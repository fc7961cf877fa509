"""Device meshes: on 8 simulated CPU devices (a subprocess, tests/sharding_check.py) a sharded edit,
the preservation term measured on a sharded model and a sharded training step equal the
single-device ones, parameters really are split, and a
checkpoint saved on a (4, 2) mesh restores onto (8, 1) and onto one device; in this process, the
placement rules and their errors."""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mend_jax import sharding

from conftest import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))
# One worker runs this module: its fixture starts one 8-device process (not one per worker).
pytestmark = pytest.mark.xdist_group("sharding")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the check adds the 8 devices to conftest's XLA_FLAGS
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), str(tmp_path_factory.mktemp("mesh"))],
                        env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_a_sharded_edit_equals_the_single_device_edit(measured, family):
  r = measured[f"edit/{family}"]
  assert measured["devices"] == 8
  assert r["max_diff"] <= 1e-6 and r["loss_diff"] <= 1e-6  # float32 summation order only
  # Really sharded: most matrices, every edited kernel, and the batch are split, and the edited
  # kernels keep the placement of the kernels they replace.
  assert r["n_devices"] == 8 and r["split_params"] >= r["n_params"] // 3
  assert r["split_edited"] >= 6 and r["same_sharding"]
  assert r["batch_split"] >= 3


@pytest.mark.parametrize("shard_editor", [False, True])
def test_the_preservation_term_measured_on_a_mesh_equals_one_device(measured, shard_editor):
  r = measured[f"prepare/shard_editor={shard_editor}"]
  # Second moments of O(1) inputs summed over a few hundred rows, then an eigendecomposition.
  assert r["not_identity"] > 1e-2 and r["max_diff"] <= 1e-4
  assert r["same_sharding"] and r["n_devices"] == 8


@pytest.mark.parametrize("shard_editor", [False, True])
def test_a_sharded_training_step_equals_the_single_device_step(measured, shard_editor):
  r = measured[f"train_step/shard_editor={shard_editor}"]
  single, sharded = r["loss"]
  assert abs(single - sharded) <= 1e-5 * abs(single)
  # The step moved the editor by about lr (1e-3) per leaf; the two placements agree to 1e-6 of it.
  assert r["update"] > 1e-4 and r["max_diff"] <= 1e-6
  assert r["aux_diff"] <= 1e-4  # normalisation statistics (sums of squares of O(1-10) values)
  assert (r["split_state"] > 0) == shard_editor


def test_a_checkpoint_moves_between_meshes(measured):
  assert measured["checkpoint/saved_split"] > 0
  for name, devices, split in (("8x1", 8, False), ("8x1_split", 8, True), ("one_device", 1, False)):
    r = measured[f"checkpoint/{name}"]
    assert r["max_diff"] == 0.0 and r["trained_vs_saved"] == 0.0, name
    assert r["n_devices"] == devices and (r["split"] > 0) == split, name
  assert measured["checkpoint/resumed_one_device_steps"] == 6


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_evaluation_on_a_mesh_equals_one_device(measured, mode):
  for key, (single, sharded) in measured[f"evaluate/{mode}"].items():
    assert abs(single - sharded) <= 1e-4 * max(1.0, abs(single)), key


def test_rules_split_matrices_and_replicate_what_does_not_divide():
  model = tiny_model("llama")
  mesh = jax.sharding.Mesh([[jax.devices()[0]]], sharding.AXES)
  specs = sharding.param_specs(model, model.params, mesh)
  assert specs["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"] == P("fsdp", None)
  assert specs["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp")
  assert specs["model"]["layers"]["0"]["input_layernorm"]["weight"] == P()

  class Wide:  # a stand-in mesh of 3 fsdp devices: 32 columns do not divide, 48 do
    shape = {"data": 1, "fsdp": 3}
  assert sharding.spec_for("x/up_proj/kernel", (32, 64), sharding.RULES["llama"], Wide) == P()
  assert sharding.spec_for("x/up_proj/kernel", (32, 48), sharding.RULES["llama"], Wide) == P(None, "fsdp")
  assert sharding.batch_spec((6, 5), type("M", (), {"shape": {"data": 4, "fsdp": 1}})) == P()
  assert sharding.batch_spec((8, 5), type("M", (), {"shape": {"data": 4, "fsdp": 1}})) == P("data")


def test_a_mesh_larger_than_the_machine_is_a_clear_error():
  with pytest.raises(ValueError, match="needs 64 devices.*xla_force_host_platform_device_count"):
    sharding.make_mesh(8, 8)
  with pytest.raises(ValueError, match="mesh.fsdp must be an integer >= 1"):
    sharding.make_mesh(1, 0)
