"""MEND against its baselines (FT, FT+KL, ENN, KE) and its ablations on the same benchmark, and
their cost against model size.

  python scripts/compare.py [--config synthetic|facts] [--algs mend,ke,enn,ft,ft_kl] [--ablations]
                            [--workdir runs/compare] [--out docs/compare.md] [--sizes 4x512,6x768,12x768]
                            [--no-train] [--no-sizes] [-- --config.train.max_steps=2000 ...]

1. Quality: for each algorithm, `mend-train --config CONFIG --config.alg=ALG` (default: the
   offline synthetic benchmark; `--config facts`: the real-facts benchmark on SmolLM2-135M), with
   the same data, base model, editable layers, training budget and objective; per-algorithm
   settings from the config's `ALG` section and `ALG_TRAIN` below. `--ablations` adds the paper's
   MEND ablations (ABLATIONS below). Each run is its own process; then one table: edit success,
   reliability, locality (unchanged predictions, and accuracy drawdown), perplexity of the
   locality answers and of plain text before and after, time per edit, peak memory of the
   process (training + evaluation), trained parameters.
2. Cost against size: `mend-bench` children (mend_jax.bench) on random GPT-2s of the given sizes (blocks x
   width; the workload of the benchmark), 2 threads: peak memory and time of a training step
   (learned editors) and of an edit, plotted against the number of model parameters
   (compare_sizes.png beside --out), like the paper's Figures 3 and 4.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from mend_jax import bench, editors, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training overrides per algorithm on the synthetic benchmark. ENN trains the base model itself,
# so its step size is that of fine-tuning a model rather than of a fresh editor network.
ALG_TRAIN = {"enn": ["--config.train.lr=1e-5", "--config.train.lr_lr=1e-3"]}
# The paper's MEND ablations (its Table 6): name -> overrides of the MEND run.
ABLATIONS = {
    "mend_no_norm": ["--config.mend.norm=False"],
    "mend_no_id_init": ["--config.mend.identity_init=False"],
    "mend_only_u": ["--config.mend.combine=False", "--config.mend.x_only=True"],
    "mend_only_delta": ["--config.mend.combine=False", "--config.mend.delta_only=True"],
}


def quality(runs: dict, workdir: str, config: str, extra) -> list:
  """runs: {name: (alg, overrides)}; each trains in its own process unless its results.json exists
  (delete it, or the run's directory, to run it again)."""
  rows = []
  for name, (alg, overrides) in runs.items():
    wd = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(wd, "results.json")):
      with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
      rows.append({"name": name, "alg": alg, "wall_s": res.get("total_time_s", 0.0), **res})
      print(f"[{name}] results found in {wd}", flush=True)
      continue
    cmd = [sys.executable, "-m", "mend_jax.cli", "train", "--workdir", wd, f"--config={config}", f"--config.alg={alg}",
           "--config.eval.show_edit=False", *ALG_TRAIN.get(alg, []), *overrides, *extra]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(workdir, f"{name}.log"), "w") as log:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
      sys.exit(f"error: training {name} failed (exit {proc.returncode}); see {log.name}")
    with open(os.path.join(wd, "results.json")) as f:
      res = json.load(f)
    res["wall_s"] = time.time() - t0
    rows.append({"name": name, "alg": alg, **res})
  return rows


def _f(r, key, fmt="{:.3f}"):
  return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "-"


def quality_table(rows) -> str:
  out = ["| editor | edit success (paraphrase) | reliability | locality unchanged | locality acc drawdown "
         "| locality ppl pre -> post | text ppl pre -> post | time per edit ms | peak memory GB | trained parameters "
         "| training steps | wall s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    text = f"{_f(r, 'text_ppl_pre', '{:.2f}')} -> {_f(r, 'text_ppl_post', '{:.2f}')}" if "text_ppl_pre" in r else "-"
    out.append(f"| {r['name']} | {_f(r, 'edit_success')} | {_f(r, 'reliability')} | {_f(r, 'locality_unchanged')} "
               f"| {_f(r, 'locality_drawdown')} | {_f(r, 'ppl_pre', '{:.2f}')} -> {_f(r, 'ppl_post', '{:.2f}')} "
               f"| {text} | {1000 * r['time_per_edit_s']:.1f} | {r['peak_rss_gb']:.2f} "
               f"| {r.get('editor_params', 0):,} | {r.get('steps', 0)} | {r['wall_s']:.0f} |")
  return "\n".join(out)


def sizes(algs, size_list, reps) -> list:
  rows = []
  for n_layer, width in size_list:
    for alg in algs:
      print(f"[{alg}, GPT-2 {n_layer}x{width}] ...", flush=True)
      try:
        rows.append({**bench.run_child(alg, 2, reps, n_layer, width), "threads": 2})
      except RuntimeError as e:
        print(f"  failed: {str(e)[-300:]}")
        rows.append({"alg": alg, "n_layer": n_layer, "width": width, "failed": True})
  return rows


def sizes_table(rows) -> str:
  out = ["| editor | model | model params | train step s | edit s | peak GB |", "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("failed"):
      out.append(f"| {r['alg']} | {r['n_layer']}x{r['width']} | - | failed | failed | - |")
      continue
    step = f"{r['train_step_s']:.3f}" if "train_step_s" in r else "-"
    out.append(f"| {r['alg']} | {r['n_layer']}x{r['width']} | {r['model_params'] / 1e6:.0f}M | {step} "
               f"| {r['edit_s']:.3f} | {r['peak_gb']:.2f} |")
  return "\n".join(out)


def plot_sizes(rows, path) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for alg in dict.fromkeys(r["alg"] for r in rows):
    rs = sorted((r for r in rows if r["alg"] == alg and not r.get("failed")), key=lambda r: r["model_params"])
    if not rs:
      continue
    x = [r["model_params"] / 1e6 for r in rs]
    axes[0].plot(x, [r["peak_gb"] for r in rs], "o-", label=alg)
    if "train_step_s" in rs[0]:
      axes[1].plot(x, [r["train_step_s"] for r in rs], "o-", label=f"{alg} train step")
    axes[1].plot(x, [r["edit_s"] for r in rs], "s--", label=f"{alg} edit")
  axes[0].set_title("peak memory (GB), training + edit")
  axes[1].set_title("seconds (2 threads)")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("GPT-2 parameters (M)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return report.save_figure(fig, path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="synthetic", help="the benchmark: a config name or file (mend-train --config)")
  ap.add_argument("--algs", default="mend,ke,enn,ft,ft_kl")
  ap.add_argument("--ablations", action="store_true", help="also MEND's ablations (no norm, no id init, only u/delta)")
  ap.add_argument("--workdir", default="runs/compare")
  ap.add_argument("--out", default=None, help="append the tables to this markdown file (figure beside it)")
  ap.add_argument("--sizes", default="4x512,6x768,12x768", help="GPT-2 blocks x width, comma-separated")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--no-train", action="store_true", help="skip the quality comparison")
  ap.add_argument("--no-sizes", action="store_true", help="skip the cost-against-size measurements")
  args, extra = ap.parse_known_args()
  alg_list = [a.strip() for a in args.algs.split(",") if a.strip()]
  if not alg_list or any(a not in editors.NAMES for a in alg_list):
    sys.exit(f"error: --algs {args.algs!r}: each must be one of {editors.NAMES}")
  extra = [e for e in extra if e != "--"]
  bad_extra = [e for e in extra if not e.startswith("--config.")]
  if bad_extra:
    sys.exit(f"error: unknown arguments {bad_extra} (only --config.* overrides are passed to mend-train)")
  try:
    size_list = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    assert all(len(s) == 2 for s in size_list)
  except (ValueError, AssertionError):
    sys.exit(f"error: --sizes {args.sizes!r} must look like 4x512,6x768")
  os.makedirs(args.workdir, exist_ok=True)
  parts = []
  if not args.no_train:
    runs = {a: (a, []) for a in alg_list}
    if args.ablations:
      runs.update({name: ("mend", o) for name, o in ABLATIONS.items()})
    rows = quality(runs, args.workdir, args.config, extra)
    text = quality_table(rows)
    print(text)
    flags = f"--config {args.config} --algs {args.algs}{' --ablations' if args.ablations else ''}"
    parts.append(f"`python scripts/compare.py {flags} --no-sizes {' '.join(extra)}`".replace(" `", "`") + "\n\n" + text)
    report.write_json(os.path.join(args.workdir, "quality.json"), rows)
  if not args.no_sizes:
    rows = sizes(alg_list, size_list, args.reps)
    text = sizes_table(rows)
    print(text)
    report.write_json(os.path.join(args.workdir, "sizes.json"), rows)
    fig_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else args.workdir
    fig = plot_sizes(rows, os.path.join(fig_dir, "compare_sizes.png"))
    print("figure:", fig)
    parts.append(f"`python scripts/compare.py --algs {args.algs} --no-train --sizes {args.sizes}` "
                 f"(2 threads)\n\n{text}\n\n![memory and time against model size]({os.path.basename(fig)})")
  if args.out and parts:
    with open(args.out, "a") as f:
      f.write(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores:\n\n" + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
  main()
