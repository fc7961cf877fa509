"""The command line: a bad config, override or flag ends with one `error:` line and exit status 2
(no traceback); packaged configs are found by name."""

import os
import subprocess
import sys

import pytest

from mend_jax import cli, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _train(*args):
  return subprocess.run([sys.executable, "-m", "mend_jax.cli", "train", "--workdir", "/tmp/unused", *args],
                        cwd=ROOT, capture_output=True, text=True, env=ENV)


@pytest.mark.parametrize("args, message", [
    (["--config.train.nope=1"], "'nope' (unknown key"),
    (["--config.train.lr=abc"], "could not convert string to float"),
    (["--config", "zsre:t5-huge"], "variant must be one of"),
    (["--config=/no/such/config.py"], "no such file, and not one of the packaged configs"),
    (["--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
])
def test_bad_command_lines_end_with_one_error_line(args, message):
  r = _train(*args)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def test_config_names_resolve_to_packaged_files(tmp_path):
  cfg, rest = cli._config_from_argv(["mend-train", "--config", "zsre:bart-base", "--workdir", "w"])
  assert cfg.model.name_or_path == "facebook/bart-base" and rest == ["mend-train", "--workdir", "w"]
  cfg, _ = cli._config_from_argv(["mend-train", f"--config={configs.path('synthetic')}:long"])
  assert cfg.train.max_steps == 16000
  cfg, _ = cli._config_from_argv(["mend-train"])
  assert cfg.task == "synthetic" and cfg.train.max_steps == 4000  # the default: the demo
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return 1\n")
  with pytest.raises(ValueError, match="returned int, not a ConfigDict"):
    cli._config_from_argv(["mend-train", f"--config={bad}"])


def test_a_workdir_that_is_a_file_and_bad_evaluate_flags_are_one_line(tmp_path):
  afile = tmp_path / "notadir"
  afile.write_text("x")
  r = subprocess.run([sys.executable, "-m", "mend_jax.cli", "train", f"--workdir={afile}"], cwd=ROOT,
                     capture_output=True, text=True, env=ENV)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "is a file; expected a directory" in r.stderr
  for flag, message in (("--k=0", "--k must be >= 1"), ("--n=0", "--n must be -1"),
                        ("--protect=test", "protect='test' is the evaluated split")):
    r = subprocess.run([sys.executable, "-m", "mend_jax.cli", "evaluate", f"--workdir={tmp_path}", flag], cwd=ROOT,
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
