"""Speed and memory of MEND training and editing on the issue's reference workload.

  python scripts/bench.py [--threads 1,2] [--reps 5] [--out docs/bench.md]

Workload (the same one the official PyTorch code was measured on): GPT-2 with 6 layers, width 768,
vocabulary 50257, random weights; MEND on both MLP matrices of the last 3 blocks, rank 1920;
10 edit + 10 locality sequences of 32 tokens, the last 10 tokens of each edit labelled.
Rows: median seconds of a training step, an edit, and the floor (one plain jitted forward +
backward of the model wrt all its parameters on the edit batch); first-call (compile) times; peak
resident memory of the process. Each thread count runs in its own process pinned with `taskset`
to that many cores, with XLA's CPU thread pool sized to match.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = {"train_step_s": {1: 9.72, 2: 5.58}, "edit_s": {1: 3.64, 2: 2.11}, "peak_gb": 2.9}


def child(reps: int) -> dict:
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers as tf

  from mend_jax import data, losses, models, train
  from mend_jax.editor import EditorConfig
  from mend_jax.mend import MEND

  cfg = tf.GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
  model = models.model_from_config(cfg)
  editor = MEND(model, EditorConfig(rank=1920))
  rng = np.random.default_rng(0)

  def seqs(n=10, t=32, n_lab=10, read_pos=True):
    ids = rng.integers(0, cfg.vocab_size, size=(n, t)).astype(np.int32)
    labels = np.where(np.arange(t)[None] >= t - n_lab, ids, -100).astype(np.int32)
    b = {"input_ids": ids, "attention_mask": np.ones((n, t), np.int32), "labels": labels}
    if read_pos:  # what EditData batches carry: the positions the losses read
      b["read_pos"], b["read_mask"] = data.read_positions(labels)
    return {k: jnp.asarray(v) for k, v in b.items()}

  # The locality KL reads every token (kl_positions="all", as the official code on text).
  edit, loc = seqs(), seqs(read_pos=False)
  batch = {"edit": edit, "equiv": edit, "loc": loc}
  tcfg = train.TrainConfig(n_edits=10, n_loc=10, accumulate=1, kl_positions="all")
  step = train.make_train_step(editor, tcfg)
  state = train.init_state(editor, train.make_optimizer(tcfg), 0)
  params = model.params

  def timed(fn, n):
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return times

  out = {}
  holder = {"state": state}

  def run_step():
    holder["state"], m = step(holder["state"], params, batch)
    return m

  first = timed(run_step, 1)[0]
  out["train_step_compile_s"] = first
  out["train_step_s"] = float(np.median(timed(run_step, reps)))

  ed_state = editor.init(jax.random.PRNGKey(0))
  run_edit = lambda: editor.jit_edit(ed_state, params, edit)
  out["edit_compile_s"] = timed(run_edit, 1)[0]
  out["edit_s"] = float(np.median(timed(run_edit, reps)))

  floor = jax.jit(jax.value_and_grad(lambda p, b: losses.nll("causal_lm", model.logits(p, b), b)))
  plain = {k: v for k, v in edit.items() if not k.startswith("read_")}
  run_floor = lambda: floor(params, plain)
  out["floor_compile_s"] = timed(run_floor, 1)[0]
  out["floor_s"] = float(np.median(timed(run_floor, reps)))
  out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  out["editor_params"] = editor.num_params(ed_state)
  return out


def table(results: dict) -> str:
  rows = [
      "| threads | train step s (official) | edit s (official) | floor s | edit / floor | compile s: step, edit, floor | peak GB (official 2.9) |",
      "|---|---|---|---|---|---|---|",
  ]
  for n, r in sorted(results.items()):
    rows.append(
        f"| {n} | {r['train_step_s']:.3f} ({OFFICIAL['train_step_s'].get(n, float('nan'))}) "
        f"| {r['edit_s']:.3f} ({OFFICIAL['edit_s'].get(n, float('nan'))}) | {r['floor_s']:.3f} "
        f"| {r['edit_s'] / r['floor_s']:.2f} | {r['train_step_compile_s']:.1f}, {r['edit_compile_s']:.1f}, "
        f"{r['floor_compile_s']:.1f} | {r['peak_gb']:.2f} |")
  return "\n".join(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None, help="append the table to this markdown file")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args.reps)))
    return
  try:
    threads = [int(t) for t in args.threads.split(",")]
  except ValueError:
    sys.exit(f"error: --threads must be comma-separated integers, got {args.threads!r}")
  if any(t < 1 or t > os.cpu_count() for t in threads):
    sys.exit(f"error: --threads {threads}: each must be between 1 and this machine's {os.cpu_count()} cores")
  results = {}
  for n in threads:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}").strip(),
           "OMP_NUM_THREADS": str(n)}
    cmd = ["taskset", "-c", ",".join(str(i) for i in range(n)), sys.executable, __file__, "--child", "--reps", str(args.reps)]
    print(f"[{n} thread(s)] {' '.join(cmd[:4])} ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
      sys.exit(f"error: benchmark child for {n} thread(s) failed:\n{proc.stderr[-2000:]}")
    results[n] = json.loads(line[0][len("RESULT "):])
  text = table(results)
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(f"\n`python scripts/bench.py --threads {args.threads} --reps {args.reps}` on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; editor parameters {results[threads[0]]['editor_params']:,}.\n\n{text}\n")


if __name__ == "__main__":
  main()
