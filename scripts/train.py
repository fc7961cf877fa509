"""Train a MEND editor, evaluate it and save it.  Usage:

  python scripts/train.py --workdir runs/demo [--config configs/synthetic_demo.py] [--config.train.max_steps=500]

With no --config it runs the offline demo. Rerunning the same command resumes from the last checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags

from scripts import common

_CONFIG = common.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics, results)", required=True)


def main(argv):
  del argv
  from mend_jax import experiment

  common.run_cli(lambda: experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
