"""A trained editor's results with the base model in float32 and in bfloat16, side by side.

  python scripts/precision.py --workdir runs/demo [--also runs/demo_bf16] [--split test]

The editor saved in --workdir is applied to its own base model loaded in float32 and in bfloat16
(the experiment config stored with the checkpoint; only model.dtype changes) and evaluated on the
same edits: the change that bfloat16 alone makes. --also adds the results.json of runs trained
with --config.model.dtype=bfloat16 (training in bfloat16 as well).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mend_jax import checkpoint, experiment  # noqa: E402
from mend_jax.configs import common  # noqa: E402

KEYS = ("edit_success", "reliability", "locality_unchanged", "locality_drawdown", "ppl_pre", "ppl_post",
        "time_per_edit_s")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--also", default="", help="comma-separated work directories trained in bfloat16")
  ap.add_argument("--split", default="test", choices=("train", "val", "test"))
  args = ap.parse_args()
  if not os.path.isdir(args.workdir):
    sys.exit(f"error: --workdir {args.workdir!r} is not a directory")
  stored = checkpoint.read_meta(args.workdir).get("config")
  if stored is None:
    sys.exit(f"error: the checkpoint in {args.workdir!r} has no stored experiment config")
  rows = []
  for dtype in ("float32", "bfloat16"):
    config = common.from_stored(stored)
    config.model.dtype = dtype
    res = experiment.evaluate_workdir(config, args.workdir, split=args.split)
    rows.append((f"{args.workdir} (trained in {stored['model'].get('dtype', 'float32')}), model in {dtype}", res))
  for wd in filter(None, args.also.split(",")):
    with open(os.path.join(wd, "results.json")) as f:
      rows.append((f"{wd} (trained and evaluated in bfloat16)", json.load(f)))
  lines = ["| run | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
  for name, r in rows:
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "-"
                                             for k in KEYS) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
