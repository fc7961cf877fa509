"""Experiment configs: `common.py` is the one schema; each other file is an experiment family
whose `get_config(arg)` takes a variant (`--config=mend_jax/configs/zsre.py:t5-small`, or the
short form `--config=zsre:t5-small` on the command line)."""

import os

DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("synthetic", "facts", "zsre", "fever", "wikitext")


def path(name: str) -> str:
  """The file of the packaged config `name` (one of NAMES)."""
  if name not in NAMES:
    raise ValueError(f"no packaged config {name!r}; expected one of {NAMES} or a path to a config file")
  return os.path.join(DIR, f"{name}.py")
