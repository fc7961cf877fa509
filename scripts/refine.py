"""A trained MEND editor's edits with refinement steps (`MENDConfig.refine`), one row per setting.

  python scripts/refine.py --workdir runs/ws/warm3 --k 125 --edit_steps 4 \
      --settings 0,50:1e-3:0.1:125,100:1e-3:0.03:125 [--n 875] [--out table.md]

Each setting is STEPS[:LR:C_EDIT:ROWS] (0: the editor alone; omitted parts: the editor's own
refine_lr, refine_c_edit, refine_loc_rows). The editor saved in --workdir is evaluated on the
test split, --k edits at once (`evaluate.evaluate`), its refinement drawing locality examples
from the training split's (`experiment.loc_pool`). Prints a markdown table (and writes it to --out).
"""

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mend_jax import checkpoint, editors, experiment, report  # noqa: E402
from mend_jax import evaluate as eval_lib  # noqa: E402
from mend_jax.configs import common  # noqa: E402


def parse_setting(text: str) -> dict:
  parts = text.split(":")
  if not 1 <= len(parts) <= 4:
    raise ValueError(f"--settings: {text!r} is not STEPS[:LR:C_EDIT:ROWS]")
  try:
    out = {"refine": int(parts[0])}
    for key, cast, value in zip(("refine_lr", "refine_c_edit", "refine_loc_rows"), (float, float, int), parts[1:]):
      out[key] = cast(value)
  except ValueError:
    raise ValueError(f"--settings: {text!r} is not STEPS[:LR:C_EDIT:ROWS] (integer steps and rows, numbers lr "
                     "and c_edit)") from None
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--k", type=int, default=1)
  ap.add_argument("--n", type=int, default=-1, help="test edits (-1: the whole split)")
  ap.add_argument("--edit_steps", type=int, default=0, help="the editor's steps per edit (0: as trained)")
  ap.add_argument("--settings", default="0,50", help="comma-separated STEPS[:LR:C_EDIT:ROWS]")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  try:
    settings = [parse_setting(s) for s in args.settings.split(",")]
    if args.k < 1 or args.n == 0 or args.n < -1:
      raise ValueError(f"--k must be >= 1 and --n -1 or >= 1, got {args.k} and {args.n}")
    config = common.from_stored(checkpoint.read_meta(args.workdir).get("config") or {})
    config.eval.edit_steps = args.edit_steps
    task = experiment.prepare(config)
    loaded = experiment._loaded(args.workdir, task, config)
    if loaded.editor.name != "mend":
      raise ValueError(f"refinement applies to MEND editors; {args.workdir!r} holds {loaded.editor.name!r}")
    pool = experiment.loc_pool(task.train)
    rows = []
    for s in settings:
      cfg = dataclasses.replace(loaded.editor.cfg, **s)
      editor = editors.make("mend", loaded.editor.model, cfg)
      r = eval_lib.evaluate(editor, editor.with_loc_pool(loaded.state, pool), task.model.params, task.test,
                            n_edits=args.n if args.n > 0 else None, k=args.k)
      rows.append(f"| {cfg.refine} | {cfg.refine_lr:g} | {cfg.refine_c_edit:g} | {cfg.refine_loc_rows} | "
                  f"{r['edit_success']:.3f} | {r['reliability']:.3f} | {r['locality_unchanged']:.3f} | "
                  f"{1000 * r['time_per_edit_s']:.1f} |")
      print(rows[-1], flush=True)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  table = "\n".join([f"{args.workdir}, k = {args.k}, {cfg.edit_steps} edit steps, {r['n_test_edits']} test edits", "",
                     "| refine steps | lr | c_edit | locality rows | edit success | reliability | locality unchanged "
                     "| ms per edit |", "|---|---|---|---|---|---|---|---|"] + rows)
  print(table)
  if args.out:
    report.atomic_write_text(args.out, table + "\n")


if __name__ == "__main__":
  main()
