"""The README's Python example runs as written, and its commands name real console scripts and
packaged configs."""

import os
import re

import numpy as np

from mend_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks, "README has no python example"
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  assert np.isfinite(float(scope["info"]["loss_before"]))
  assert float(np.asarray(scope["info"]["update_norm"]).max()) > 0


def test_readme_commands_use_existing_scripts_and_configs():
  commands = set(re.findall(r"\b(mend-[a-z]+)\b", README)) - {"mend-jax"}
  assert commands == {"mend-train", "mend-evaluate", "mend-edit", "mend-bench"}
  names = re.findall(r"--config[ =]([a-z]+)(?=[:\s])", README)
  assert names and set(names) <= set(configs.NAMES), names
