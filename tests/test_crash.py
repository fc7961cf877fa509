"""A run killed (SIGKILL) at any moment resumes when the same command runs again and ends
bit-identical to an uninterrupted run: same checkpoints (their arrays' checksums), same metric
rows (none duplicated), same results.

The kills come from `checkpoint.crash_point` (MEND_JAX_KILL_AT=point[@step]): while the first
step compiles, between steps, during a save (Orbax still writing), during validation, right after
a validation's checkpoint, and after training before evaluation. One work directory is killed at
each point in turn (every run after the first resumes what the kills before it left), then runs
to the end."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

# One worker runs this module, so the reference run is made once.
pytestmark = pytest.mark.xdist_group("crash")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In this order each point is reached by a run resuming from what the kills before it left, whether or
# not Orbax finished writing the step a kill interrupted (a finished save@8 still leaves before_eval).
POINTS = ["compile", "step@3", "validate", "after_val_save@4", "save@8", "before_eval"]
TIMING = {"time_s", "time_per_edit_s", "total_time_s", "train_time_s", "peak_rss_gb"}

CONFIG = """
from mend_jax.configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.cache_dir = {cache!r}
  c.data.world.n_subjects = 30
  c.model.pretrain.update(steps=30, warmup_steps=3, n_layer=1, n_embd=32, n_head=2, eval_batch_size=128)
  c.mend.rank = 16
  c.train.update(max_steps=8, val_every=4, ckpt_every=2, n_val=4, log_every=2, accumulate=2, patience=10)
  c.eval.update(n_test=8, show_edit=False)
  return c
"""


def _run(cfg, workdir, kill_at=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("MEND_JAX_KILL_AT", None)
  if kill_at:
    env["MEND_JAX_KILL_AT"] = kill_at
  return subprocess.run([sys.executable, "-m", "mend_jax.cli", "train", f"--config={cfg}", f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True)


def _outcome(workdir) -> dict:
  """What must not depend on a crash: checkpoint steps and their checksums, metric rows, results."""
  ckpts = {}
  for step in sorted(os.listdir(os.path.join(workdir, "checkpoints"))):
    with open(os.path.join(workdir, "checkpoints", step, "meta", "metadata")) as f:
      meta = json.load(f)
    ckpts[step] = (meta["checksums"], meta["best_val"], meta["bad_vals"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
  with open(os.path.join(workdir, "results.json")) as f:
    results = {k: v for k, v in json.load(f).items() if k not in TIMING}
  return {"checkpoints": ckpts, "metrics": rows, "results": results}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("crash")
  cfg = root / "config.py"
  cfg.write_text(CONFIG.format(cache=str(root / "cache")))
  r = _run(cfg, root / "reference")
  assert r.returncode == 0, r.stderr[-2000:]
  return root, cfg, _outcome(root / "reference")


def test_a_run_killed_at_every_point_resumes_to_the_same_end(reference):
  root, cfg, want = reference
  workdir = root / "killed"
  for point in POINTS:
    killed = _run(cfg, workdir, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-1500:])
    assert not (workdir / "results.json").exists(), point  # a killed run has not finished
  again = _run(cfg, workdir)
  assert again.returncode == 0, again.stderr[-2000:]
  got = _outcome(workdir)
  assert got["checkpoints"] == want["checkpoints"]
  assert got["metrics"] == want["metrics"]  # no row lost or logged twice
  assert got["results"] == want["results"]
  assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]  # no half-written step left


def test_the_command_line_refuses_to_replace_or_misread_a_workdir(reference):
  """On a copy of a trained work directory: evaluating it writes its own file; training another
  editor into it, or evaluating it with a damaged array file, ends with one `error:` line; and
  results.json stays as it was throughout."""
  root, cfg, _ = reference
  wd = root / "copy"
  shutil.copytree(root / "reference", wd)
  results = (wd / "results.json").read_bytes()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # A successful evaluation writes its own file and leaves training's results alone.
  r = subprocess.run([sys.executable, "-m", "mend_jax.cli", "evaluate", f"--workdir={wd}", "--n=4"], cwd=ROOT,
                     env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert (wd / "results.json").read_bytes() == results
  with open(wd / "eval_test_k1_n4.json") as f:
    assert 0.0 <= json.load(f)["edit_success"] <= 1.0
  r = subprocess.run([sys.executable, "-m", "mend_jax.cli", "train", f"--config={cfg}", f"--workdir={wd}",
                      "--config.alg=ft"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "alg is 'mend', but this run's is 'ft'" in r.stderr
  assert r.stderr.count("\n") == 1, r.stderr
  arrays = [os.path.join(d, f) for d, _, fs in os.walk(wd / "checkpoints") for f in fs if f"{os.sep}editor{os.sep}d" in d]
  path = max(arrays, key=os.path.getsize)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(path, "wb").write(bytes(raw))
  r = subprocess.run([sys.executable, "-m", "mend_jax.cli", "evaluate", f"--workdir={wd}"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith("error: checkpoint ") and r.stderr.count("\n") == 1, r.stderr
  assert (wd / "results.json").read_bytes() == results
