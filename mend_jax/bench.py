"""Speed and memory of every editor (MEND, ENN, KE, FT, FT+KL) on a reference workload.

  mend-bench [--algs mend,enn,ke,ft] [--threads 1,2] [--reps 5] [--out docs/bench.md]
  mend-bench --algs mend --layers 12 --width 768 --json out.json     (another size)
  mend-bench --algs mend --threads 2 --official official.json        (beside the official code)

With --official, the JSON that ../shared/anchors/official_mend_bench.py --json wrote just before on
the same machine, each row shows the official median of the same editor, program, thread count
and model size in parentheses, and the second table a third of it (the 3x target).

Workload (the one the official PyTorch code was measured on): GPT-2 with 6 layers, width 768,
vocabulary 50257, random weights; the MLP matrices of the last 3 blocks are edited; 10 edit + 10
locality sequences of 32 tokens, the last 10 tokens of each edit labelled; the locality KL reads
every token (as the official code on text). MEND: rank 1920. KE, ENN: their official sizes.
FT / FT+KL: RMSprop steps until every edit of the batch is right or 100 steps.
Rows: median seconds of a training step (learned editors) and of an edit, FT's steps per edit,
the floor (one plain jitted forward + backward of the model wrt all its parameters on the edit
batch), first-call (compile) times, the process's peak resident memory, and for learned editors
an A/B of the edit (editors.jit_edit) against jax.jit(editor.edit), which also copies the model out
of the program. A second table gives each program's FLOPs (XLA's count) and the time they would
take at the rate of one large matmul on the same threads (a lower bound). Each (algorithm,
thread count) runs in its own process pinned with `taskset` to that many cores, with XLA's CPU
thread pool sized to match.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers as tf

from mend_jax import editors, losses, models, train, tree
from mend_jax.data.batches import read_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The editor names of ../shared/anchors/official_mend_bench.py (the official code calls KE "efk").
OFFICIAL_ALGS = {"mend": "mend", "enn": "enn", "efk": "ke", "ft": "ft"}
ALG_CFG = {"mend": {"rank": 1920}, "enn": {}, "ke": {}, "ft": {"lr": 1e-4}, "ft_kl": {"lr": 1e-4}}


def measure(alg: str, reps: int, n_layer: int, width: int, dtype: str = "float32", cached: bool = False) -> dict:
  """Times and memory of editor `alg` on the workload (module docstring) in this process, on
  JAX's default device, with the base model in `dtype` (float32 or bfloat16). cached: the
  batches carry the input of the lowest edited block (cached frozen activations, computed once
  before timing), so the steps run only the edited blocks and the head."""
  cfg = tf.GPT2Config(n_layer=n_layer, n_embd=width, n_head=max(1, width // 64), vocab_size=50257, n_positions=1024)
  model = models.model_from_config(cfg, dtype=dtype)
  params = model.params
  editor = editors.make(alg, model, ALG_CFG[alg])
  rng = np.random.default_rng(0)

  def seqs(n=10, t=32, n_lab=10, read_pos=True):
    ids = rng.integers(0, cfg.vocab_size, size=(n, t)).astype(np.int32)
    labels = np.where(np.arange(t)[None] >= t - n_lab, ids, -100).astype(np.int32)
    b = {"input_ids": ids, "attention_mask": np.ones((n, t), np.int32), "labels": labels}
    if read_pos:  # what EditData batches carry: the positions the losses read
      b["read_pos"], b["read_mask"] = read_positions(labels)
    return {k: jnp.asarray(v) for k, v in b.items()}

  edit, loc = seqs(), seqs(read_pos=False)
  if cached:
    if not editor.frozen_prefix:
      raise ValueError(f"{alg} changes the frozen blocks; it cannot use cached activations")
    block_input = jax.jit(model.block_input)
    edit, loc = ({**b, "hidden": block_input(params, b)} for b in (edit, loc))
  batch = {"edit": edit, "equiv": edit, "loc": loc}

  def timed(fn, n):
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return times

  out = {"alg": alg, "n_layer": n_layer, "width": width, "model_params": tree.num_elements(params), "dtype": dtype,
         "cached": cached, "device": jax.devices()[0].device_kind}
  tcfg = train.TrainConfig(n_edits=10, n_loc=10, accumulate=1, kl_positions="all")
  if editor.learned:
    step = train.make_train_step(editor, tcfg)
    holder = {"state": train.init_state(editor, train.make_optimizer(tcfg, editor), 0, params)}
    out["editor_params"] = tree.num_elements(holder["state"].editor.params)

    def run_step():
      holder["state"], m = step(holder["state"], params, batch)
      return m

    out["train_step_compile_s"] = timed(run_step, 1)[0]
    out["train_step_s"] = float(np.median(timed(run_step, reps)))
    ed_state = holder["state"].editor
    del holder
  else:
    ed_state = jax.jit(editor.init)(jax.random.PRNGKey(0), params)
    ed_state = editor.with_loc_pool(ed_state, seqs(n=100, read_pos=False))
    out["editor_params"] = 0
  start = editor.pre_edit_params(ed_state, params)
  edit_fn = editors.jit_edit(editor)  # returns only the edited leaves from the program (no model copy)
  run_edit = lambda: edit_fn(ed_state, start, edit, check=False)  # the edit alone, as the official timing
  out["edit_compile_s"] = timed(run_edit, 1)[0]
  out["edit_s"] = float(np.median(timed(run_edit, reps)))
  info = jax.device_get(run_edit()[1])
  if "n_steps" in info:
    out["ft_steps"] = int(info["n_steps"])
    out["ft_success"] = bool(np.all(info["success"]))

  floor = jax.jit(jax.value_and_grad(lambda p, b: losses.nll("causal_lm", model.logits(p, b), b)))
  plain = {k: v for k, v in edit.items() if not k.startswith("read_") and k != "hidden"}
  run_floor = lambda: floor(params, plain)
  out["floor_compile_s"] = timed(run_floor, 1)[0]
  out["floor_s"] = float(np.median(timed(run_floor, reps)))
  out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # accelerators: the device's own peak
    out["device_peak_gb"] = stats["peak_bytes_in_use"] / 1024 ** 3
  # After the peak is read (these compile and allocate more). Learned editors only (one FT edit is
  # many passes): A/B of the edit against plain jax.jit(editor.edit), which copies every unedited
  # leaf out of the program; the two run alternately, so a slow spell of the machine hits both.
  copying = jax.jit(editor.edit)
  if editor.learned:
    run_copy = lambda: copying(ed_state, start, edit)
    timed(run_copy, 1)
    ab = [(timed(run_edit, 1)[0], timed(run_copy, 1)[0]) for _ in range(max(reps, 5))]
    out["edit_ab_s"] = float(np.median([a for a, _ in ab]))
    out["edit_copy_ab_s"] = float(np.median([b for _, b in ab]))
  # Arithmetic: XLA's FLOP count of each program, and the rate of one large matrix product on these
  # threads, the best rate XLA reaches here.
  out["edit_gflop"] = _gflop(copying, ed_state, start, edit)
  if editor.learned:
    state = train.init_state(editor, train.make_optimizer(tcfg, editor), 0, params)
    out["train_step_gflop"] = _gflop(step, state, params, batch)
  a, b = jnp.ones((1024, 4096), params_dtype(params)), jnp.ones((4096, 4096), params_dtype(params))
  mm = jax.jit(jnp.matmul)
  out["matmul_gflops"] = 2 * 1024 * 4096 * 4096 / 1e9 / min(timed(lambda: mm(a, b), reps + 1)[1:])
  return out


def params_dtype(params):
  """The floating dtype of the model's parameters."""
  return next(x.dtype for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))


def _gflop(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9


def run_child(alg: str, threads: int, reps: int, n_layer: int = 6, width: int = 768, dtype: str = "float32",
              platform: str = "cpu", cached: bool = False) -> dict:
  """`measure` in a fresh process (so peak memory is its own), through `python -m mend_jax.cli
  bench --child`, which writes its result to a JSON file. platform "cpu": pinned to `threads`
  cores; otherwise JAX's default accelerator (threads unused)."""
  if platform == "cpu":
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}").strip(),
           "OMP_NUM_THREADS": str(threads)}
    pin = ["taskset", "-c", ",".join(str(i) for i in range(threads))]
  else:
    env, pin = {**os.environ, "JAX_PLATFORMS": platform}, []
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [*pin, sys.executable, "-m", "mend_jax.cli", "bench", "--child", out, "--algs", alg, "--reps", str(reps),
           "--layers", str(n_layer), "--width", str(width), "--dtype", dtype, *(["--cached"] if cached else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
      raise RuntimeError(f"benchmark child {alg} ({platform}, {threads} thread(s), {n_layer}x{width}, {dtype}) failed:\n"
                         f"{proc.stderr[-2000:]}")
    with open(out) as f:
      return json.load(f)


def load_official(path: str) -> dict:
  """The official code's figures from the JSON that ../shared/anchors/official_mend_bench.py writes
  (--json), measured in the same run as this one: {(alg, "train_step_s" | "edit_s", threads,
  "LxW"): median seconds}. Raises ValueError naming the file when it is not such a file."""
  try:
    with open(path) as f:
      rows = json.load(f)["results"]
    out = {}
    for r in rows:
      if r["alg"] in OFFICIAL_ALGS and r["mode"] in ("train", "edit"):
        key = "train_step_s" if r["mode"] == "train" else "edit_s"
        out[(OFFICIAL_ALGS[r["alg"]], key, int(r["threads"]), r["size"].lower())] = float(r["median_s"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--official {path!r}: expected the JSON that official_mend_bench.py --json writes "
                     f"(a 'results' list of rows with alg, mode, threads, size, median_s): {e}") from None
  return out


def _official_value(r, key, official):
  """The official median for a result row (same editor, program, threads and model size), or None."""
  if not official:
    return None
  return official.get((r["alg"], key, r["threads"], f"{r['n_layer']}x{r['width']}"))


def _official(r, key, official):
  v = _official_value(r, key, official)
  return f" ({v:.3f})" if v is not None else ""


def table(results: list, official: dict | None = None) -> str:
  """Markdown table of run_child results: times (with the official medians of `load_official`, in
  parentheses, where a row matches), FT steps, floor, compile times, memory."""
  rows = [
      "| editor | threads | train step s (official) | edit s (official) | FT steps | floor s | edit / floor "
      "| compile s: step, edit | peak GB | editor params | edit s, A/B: jit_edit / jax.jit(edit) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    n, alg = r["threads"], r["alg"]
    step = f"{r['train_step_s']:.3f}{_official(r, 'train_step_s', official)}" if "train_step_s" in r else "-"
    step_c = f"{r['train_step_compile_s']:.1f}" if "train_step_compile_s" in r else "-"
    ft = f"{r['ft_steps']}{'' if r['ft_success'] else ' (not all right)'}" if "ft_steps" in r else "-"
    ab = f"{r['edit_ab_s']:.3f} / {r['edit_copy_ab_s']:.3f}" if "edit_ab_s" in r else "-"
    rows.append(
        f"| {alg} | {n} | {step} | {r['edit_s']:.3f}{_official(r, 'edit_s', official)} | {ft} | {r['floor_s']:.3f} "
        f"| {r['edit_s'] / r['floor_s']:.2f} | {step_c}, {r['edit_compile_s']:.1f} | {r['peak_gb']:.2f} "
        f"| {r['editor_params']:,} | {ab} |")
  return "\n".join(rows)


def bound_table(results: list, official: dict | None = None) -> str:
  """Each program's arithmetic against the time it took: XLA's FLOP count, and the time it would
  take if every FLOP ran at the rate of one large matrix product on the same threads (a lower bound
  for this program on this machine), next to the measured time and the 3x target (official / 3)."""
  rows = ["| editor | threads | program | GFLOP | large-matmul GFLOP/s | bound s | measured s | official / 3 s |",
          "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for prog, key in (("train step", "train_step"), ("edit", "edit")):
      if f"{key}_gflop" not in r:
        continue
      gf, rate = r[f"{key}_gflop"], r["matmul_gflops"]
      off = _official_value(r, f"{key}_s", official)
      # FT: the official total is 49 passes at another lr, not comparable with one edit here.
      target = f"{off / 3:.2f}" if off is not None and not r["alg"].startswith("ft") else "-"
      note = " (one loop pass)" if "ft_steps" in r else ""
      rows.append(f"| {r['alg']} | {r['threads']} | {prog}{note} | {gf:.1f} | {rate:.0f} | {gf / rate:.2f} "
                  f"| {r[f'{key}_s']:.3f} | {target} |")
  return "\n".join(rows)


def heading(algs: str, threads: str, reps: int, n_layer: int, width: int, dtype: str = "float32",
            cached: bool = False, official: str | None = None) -> str:
  """The line that introduces a table in docs/: the command, the machine, the date."""
  size = "" if (n_layer, width) == (6, 768) else f" --layers {n_layer} --width {width}"
  size += ("" if dtype == "float32" else f" --dtype {dtype}") + (" --cached" if cached else "")
  size += f" --official {official}" if official else ""
  return (f"`mend-bench --algs {algs} --threads {threads} --reps {reps}{size}` on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.")
