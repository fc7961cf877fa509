"""Many edits at once: MEND editors trained for k edits per step, with the summed update of the
paper against the least-squares solve and MALMEN's fit (`MENDConfig.aggregation`), each evaluated
at every k.

  python scripts/batched.py [--config synthetic:batched] [--ks 1,25,125,512] [--aggs sum,least_squares,malmen]
                            [--workdir runs/batched] [--out docs/batched_synthetic.md] [--no-train]
                            [--train-ks 1,25] [--steps 25:1500,125:500] [--streams 25,125 --stream-n 960]
                            [--eval-steps 4,5] [-- --config.seed=1 ...]

For each aggregation and each training k: `mend-train --config CONFIG` with k edits per
micro-step (STEPS below, or --steps K:N,...: micro-steps per k; `train_flags`: locality rows and
the editor's row chunk), in its own
process unless WORKDIR/AGG_kK/results.json exists; then `mend-evaluate --ks KS --nosequential`
on the test split (k held-out edits applied at once to the unedited model, for every k that the
split holds). Writes OUT: one table per aggregation (rows: the k the editor was trained for; columns:
the k it is evaluated at), the diagonal (each editor at its own k) with time per edit and the
evaluation's peak memory, and a figure (OUT's name with .png). --eval-steps S,...: every editor
is also evaluated applying itself S times per edit (`mend-evaluate --edit_steps S`), as extra rows
("applied with S steps"), with a figure of edit success and locality against the steps applied
(OUT's name with _steps.png). Editors trained with `-- --config.mend.edit_steps=N` apply N steps
in the plain rows.

Configs: `synthetic:batched` (the synthetic world with 960 held-out test edits) and `facts`
(SmolLM2-135M on the real-facts benchmark: 225 test edits, so k <= 225).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from mend_jax import checkpoint, report
from mend_jax.editors.mend_net import AGGREGATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training per k (edits per micro-step): micro-steps, and locality rows per micro-step. k = 1 keeps the
# config's own schedule (micro-batches of one edit, accumulated). Larger k: one Adam update per
# micro-step, as many locality rows as edits; the editor network runs 4096 rows at a time.
STEPS = {1: None, 25: 1500, 125: 500, 512: 250}


def train_flags(k: int, agg: str, steps: int | None) -> list[str]:
  flags = [f"--config.mend.aggregation={agg}", f"--config.train.n_edits={k}", f"--config.eval.k={k}",
           "--config.eval.show_edit=False"]
  if steps is None:
    return flags
  return flags + [f"--config.train.max_steps={steps}", "--config.train.accumulate=1", f"--config.train.n_loc={k}",
                  f"--config.train.val_every={max(steps // 5, 1)}", f"--config.train.ckpt_every={max(steps // 5, 1)}",
                  f"--config.train.n_val={k}", f"--config.train.log_every={max(steps // 50, 1)}",
                  "--config.mend.chunk=4096"]


def run(cmd: list[str], log_path: str) -> None:
  print(" ".join(cmd[1:]), flush=True)
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode != 0:
    sys.exit(f"error: {' '.join(cmd[3:5])} failed (exit {proc.returncode}); see {log_path}")


def trained_steps(wd: str) -> int:
  """The edit steps the editor in wd was trained with (its checkpoint's MENDConfig.edit_steps)."""
  return int(checkpoint.read_meta(wd)["editor_config"].get("edit_steps", 1))


def sweep(config: str, ks: list[int], train_ks: list[int], aggs: list[str], workdir: str, train: bool,
          extra: list[str], steps: dict, eval_steps: tuple[int, ...] = ()) -> dict:
  """{agg: {k_train: {"train": results.json, "eval": results_k.json["batched"], "steps": the edit
  steps it was trained with, "by_steps": {S: results_k_stepsS.json["batched"]} for S in eval_steps}}}."""
  out: dict = {}
  os.makedirs(workdir, exist_ok=True)
  for agg in aggs:
    for k in train_ks:
      wd = os.path.join(workdir, f"{agg}_k{k}")
      res_path, ks_path = os.path.join(wd, "results.json"), os.path.join(wd, "results_k.json")
      if not os.path.isfile(res_path):
        if not train:
          print(f"[{agg}, k={k}] no results in {wd}; skipped", flush=True)
          continue
        t0 = time.time()
        run([sys.executable, "-m", "mend_jax.cli", "train", "--workdir", wd, f"--config={config}",
             *train_flags(k, agg, steps.get(k, 500)), *extra], os.path.join(workdir, f"{agg}_k{k}.log"))
        print(f"  trained in {time.time() - t0:.0f} s", flush=True)
      if not os.path.isfile(ks_path):
        run([sys.executable, "-m", "mend_jax.cli", "evaluate", "--workdir", wd, "--ks", ",".join(map(str, ks)),
             "--nosequential"], os.path.join(workdir, f"{agg}_k{k}.eval.log"))
      with open(res_path) as f, open(ks_path) as g:
        out.setdefault(agg, {})[k] = {"train": json.load(f), "eval": json.load(g)["batched"],
                                      "steps": trained_steps(wd), "by_steps": {}}
      for n in eval_steps:
        path = os.path.join(wd, f"results_k_steps{n}.json")
        if not os.path.isfile(path):
          run([sys.executable, "-m", "mend_jax.cli", "evaluate", "--workdir", wd, "--ks", ",".join(map(str, ks)),
               "--nosequential", "--edit_steps", str(n)], os.path.join(workdir, f"{agg}_k{k}.steps{n}.log"))
        with open(path) as f:
          out[agg][k]["by_steps"][n] = json.load(f)["batched"]
  return out


def rows(by_k: dict):
  """(label, training results, evaluation by k, steps applied) of each editor and each steps applied."""
  for k_train, r in sorted(by_k.items()):
    yield f"trained at k={k_train}", r["train"], r["eval"], r["steps"]
    for n, ev in sorted(r["by_steps"].items()):
      yield f"trained at k={k_train}, applied with {n} steps", r["train"], ev, n


def tables(results: dict, ks: list[int]) -> str:
  parts = []
  for agg, by_k in results.items():
    for metric in ("edit_success", "locality_unchanged"):
      head = f"| {agg}: {metric.replace('_', ' ')} | " + " | ".join(f"k={k}" for k in ks) + " |"
      lines = [head, "|---|" + "---|" * len(ks)]
      for label, _, ev, _ in rows(by_k):
        cells = [f"{ev[str(k)][metric]:.3f}" if str(k) in ev else "-" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
      parts.append("\n".join(lines))
  diag = ["| aggregation | k | edit steps trained / applied | edits | edit success | reliability | locality unchanged "
          "| drawdown | time per edit ms | edit of k ms | peak memory GB | training micro-steps | training s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for agg, by_k in results.items():
    for k, r in sorted(by_k.items()):
      for _, t, ev, n in rows({k: r}):
        e = ev.get(str(k))
        if e is None:
          continue
        train_s = f"{t['train_time_s']:.0f}" if t.get("train_time_s", 0) >= 1 else "-"  # ~0: trained by an earlier process
        diag.append(f"| {agg} | {k} | {r['steps']} / {n} | {e['n_test_edits']} | {e['edit_success']:.3f} "
                    f"| {e['reliability']:.3f} | {e['locality_unchanged']:.3f} | {e['locality_drawdown']:.3f} "
                    f"| {1000 * e['time_per_edit_s']:.2f} | {1000 * k * e['time_per_edit_s']:.0f} | {e['peak_rss_gb']:.2f} "
                    f"| {t.get('steps', '-')} | {train_s} |")
  parts.append("\n".join(diag))
  return "\n\n".join(parts)


def streams(results: dict, ks: list[int], n: int, workdir: str) -> dict:
  """{label: evaluate_stream result} for the trained editors at each k of `ks`."""
  out = {}
  for agg, by_k in results.items():
    for k in ks:
      if k not in by_k:
        continue
      wd = os.path.join(workdir, f"{agg}_k{k}")
      path = os.path.join(wd, "results_stream.json")
      if not os.path.isfile(path):
        run([sys.executable, "-m", "mend_jax.cli", "evaluate", "--workdir", wd, "--stream", "--n", str(n),
             "--k", str(k), "--every", str(max(1, 100 // k))], os.path.join(workdir, f"{agg}_k{k}.stream.log"))
      with open(path) as f:
        out[f"{agg} k={k}"] = json.load(f)
  return out


def stream_summary(res_by_label: dict) -> str:
  rows = ["| editor (trained and applied at k) | edits | retained edit success | retained reliability "
          "| locality unchanged | time per edit ms |", "|---|---|---|---|---|---|"]
  for label, res in res_by_label.items():
    curve = res["curve"]  # first, middle and last measurement
    for r in (curve[i] for i in sorted({0, len(curve) // 2, len(curve) - 1})):
      rows.append(f"| {label} | {r['edits']} | {r['edit_success']:.3f} | {r['reliability']:.3f} "
                  f"| {r['locality_unchanged']:.3f} | {1000 * res.get('time_per_edit_s', float('nan')):.2f} |")
  return "\n".join(rows)


def plot(results: dict, path: str) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for agg, style in zip(AGGREGATIONS, ("o-", "s-", "^-")):
    rs = sorted((k, r["eval"][str(k)]) for k, r in results.get(agg, {}).items() if str(k) in r["eval"])
    if not rs:
      continue
    axes[0].plot([k for k, _ in rs], [e["edit_success"] for _, e in rs], style, label=agg)
    axes[1].plot([k for k, _ in rs], [e["locality_unchanged"] for _, e in rs], style, label=agg)
  for ax, name in zip(axes, ("edit success (paraphrases)", "locality unchanged")):
    ax.set_xscale("log")
    ax.set_xlabel("k edits at once (editor trained at k)")
    ax.set_title(name)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return report.save_figure(fig, path, dpi=120)


def plot_steps(results: dict, path: str) -> str:
  """Edit success and locality at each training k against the edit steps applied, per aggregation."""
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for agg, by_k in results.items():
    for k, r in sorted(by_k.items()):
      pts = sorted({r["steps"]: r["eval"], **r["by_steps"]}.items())
      pts = [(n, ev[str(k)]) for n, ev in pts if str(k) in ev]
      for ax, metric in zip(axes, ("edit_success", "locality_unchanged")):
        ax.plot([n for n, _ in pts], [e[metric] for _, e in pts], "o-",
                label=f"{agg}, k={k} (trained with {r['steps']})")
  for ax, name in zip(axes, ("edit success (paraphrases)", "locality unchanged")):
    ax.set_xlabel("edit steps applied")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(name)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return report.save_figure(fig, path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="synthetic:batched")
  p.add_argument("--ks", default="1,25,125,512")
  p.add_argument("--train-ks", default="", help="the k to train editors for (default: --ks)")
  p.add_argument("--aggs", default="sum,least_squares")
  p.add_argument("--workdir", default="runs/batched")
  p.add_argument("--out", default="docs/batched_synthetic.md")
  p.add_argument("--no-train", action="store_true", help="only tabulate the runs that exist")
  p.add_argument("--steps", default="", help="K:N,...: micro-steps of the editor trained at K (k > 1)")
  p.add_argument("--streams", default="", help="comma-separated training k whose editors also run a stream")
  p.add_argument("--stream-n", type=int, default=960, help="edits in each stream (from the test split)")
  p.add_argument("--eval-steps", default="", help="comma-separated edit steps to also apply every editor with")
  args, extra = p.parse_known_args()
  extra = [e for e in extra if e != "--"]
  def k_list(flag: str, value: str) -> list[int]:
    items = value.split(",")
    if not all(x.strip().isdigit() and int(x) >= 1 for x in items):
      p.error(f"{flag}: expected comma-separated integers >= 1, got {value!r}")
    return [int(x) for x in items]

  ks = k_list("--ks", args.ks)
  aggs = args.aggs.split(",")
  for agg in aggs:
    if agg not in AGGREGATIONS:
      p.error(f"--aggs: each must be one of {', '.join(AGGREGATIONS)}, got {agg!r}")
  steps = dict(STEPS)
  for item in filter(None, args.steps.split(",")):
    k, _, n = item.partition(":")
    if not (k.isdigit() and n.isdigit() and int(k) > 1):
      p.error(f"--steps: expected K:N with K > 1 (e.g. 25:300), got {item!r}")
    steps[int(k)] = int(n)
  train_ks = k_list("--train-ks", args.train_ks) if args.train_ks else ks
  eval_steps = tuple(k_list("--eval-steps", args.eval_steps)) if args.eval_steps else ()
  results = sweep(args.config, ks, train_ks, aggs, args.workdir, not args.no_train, extra, steps, eval_steps)
  text = tables(results, ks)
  print(text)
  figure = os.path.basename(plot(results, os.path.splitext(args.out)[0] + ".png"))
  text += f"\n\n![]({figure})\n"
  if eval_steps:
    figure = os.path.basename(plot_steps(results, os.path.splitext(args.out)[0] + "_steps.png"))
    text += f"\n![]({figure})\n"
  if args.streams:
    res = streams(results, k_list("--streams", args.streams), args.stream_n, args.workdir)
    summary = stream_summary(res)
    print(summary)
    fig = report.plot_stream(res, os.path.splitext(args.out)[0] + "_stream.png", "lifelong editing")
    text += f"\n{summary}\n\n![]({os.path.basename(fig)})\n"
  command = " ".join(["python scripts/batched.py", *(a for a in sys.argv[1:] if a != "--no-train")])
  report.atomic_write_text(args.out, f"Written by `{command}`.\n\n{text}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
