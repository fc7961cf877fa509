"""Shared bits of the command-line scripts: default config, friendly errors."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "synthetic_demo.py")


def run_cli(fn):
  """Runs fn(); user errors (bad config, missing files, mismatched checkpoints) end with one clear
  line and exit status 2 instead of a traceback from deep inside JAX."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
  from mend_jax.checkpoint import CheckpointMismatch

  try:
    return fn()
  except (ValueError, FileNotFoundError, KeyError, CheckpointMismatch) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
