"""Evaluate a trained editor on a split; writes WORKDIR/results.json and prints the table.

  python scripts/evaluate.py --workdir runs/demo [--split test] [--k 1]
  python scripts/evaluate.py --workdir runs/demo --ks 1,5,25,125 [--nosequential]

The first form writes WORKDIR/results.json. With --ks it evaluates batched editing (k edits at
once) and sequential editing (k edits one after another on one model) for each k, and writes
WORKDIR/results_k.json, WORKDIR/results_k.md (the table) and WORKDIR/k_sweep.png.

The experiment config is the one stored in the checkpoint (override with --config FILE).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags

from scripts import common

_WORKDIR = flags.DEFINE_string("workdir", None, "work directory holding the checkpoints", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "which split's edits")
_K = flags.DEFINE_integer("k", 1, "edits applied at once (batched editing)")
_N = flags.DEFINE_integer("n", -1, "number of edits (-1: the whole split)")
_KS = flags.DEFINE_list("ks", [], "comma-separated k values: batched and sequential sweep")
_SEQ = flags.DEFINE_bool("sequential", True, "with --ks: also evaluate sequential editing")


def main(argv):
  del argv

  def run():
    from mend_jax import experiment

    config = common.stored_config(_WORKDIR.value)
    config.eval.n_test = _N.value
    if _KS.value:
      try:
        ks = [int(k) for k in _KS.value]
      except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {','.join(_KS.value)!r}") from None
      experiment.evaluate_k_sweep(config, _WORKDIR.value, split=_SPLIT.value, ks=ks, sequential=_SEQ.value)
      print("wrote", os.path.join(_WORKDIR.value, "results_k.json"))
      return
    res = experiment.evaluate_workdir(config, _WORKDIR.value, split=_SPLIT.value, k=_K.value)
    print("wrote", experiment.write_results(_WORKDIR.value, res))

  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
