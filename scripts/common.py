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


def parse_flags(argv):
  """absl flag parsing with one clear line (exit 2) for an unknown or malformed config override."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: bad config override {bad}: {e} (unknown key or wrong type)", file=sys.stderr)
    sys.exit(2)


def define_config_flag():
  """--config=FILE with --config.a.b=value overrides. ml_collections applies the overrides while
  the flag is defined, so an unknown key is reported here, as one line, exit status 2."""
  from ml_collections import config_flags

  try:
    return config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "experiment config file (Python, get_config())")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in sys.argv[1:] if a.startswith("--config")]
    print(f"error: bad config override {bad}: {e} (unknown key or wrong type)", file=sys.stderr)
    sys.exit(2)


def stored_config(workdir: str):
  """The experiment config saved with the checkpoint in `workdir`."""
  import ml_collections

  from mend_jax import checkpoint

  meta = checkpoint.read_meta(workdir)
  if "config" not in meta:
    raise ValueError(f"checkpoint in {workdir!r} has no stored experiment config")
  return ml_collections.ConfigDict(meta["config"])
