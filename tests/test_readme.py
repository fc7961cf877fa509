"""The README's Python example runs as written."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  assert np.isfinite(float(scope["info"]["loss_before"]))
  assert float(np.asarray(scope["info"]["update_norm"]).max()) > 0
