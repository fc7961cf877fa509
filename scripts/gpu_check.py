"""GPU readiness in one command: the test suite, then the benchmarks in float32 and bfloat16, on
the machine's accelerator, and one markdown table of what they measured.

  python scripts/gpu_check.py [--out gpu.md] [--no-tests] [--reps 5] [--algs mend,enn,ke,ft]

1. Tests: `pytest -x tests` with JAX on the accelerator (JAX_PLATFORMS unset) and float32 matrix
   products at full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: the tests compare against
   float64 references, which TensorFloat-32 products would miss). Tests that start their own
   processes on simulated CPU devices still run there.
2. Benchmarks (`mend_jax.bench`, one process each): every editor's training step and edit on the
   6-layer GPT-2 workload, and MEND on a 24-layer GPT-2 of width 768 editing the last 3 blocks
   (in full, and with cached frozen activations), with the base model in float32 and in bfloat16: median seconds, the plain forward + backward
   floor, compile times and the device's peak memory.
The table is printed and written to --out (default: gpu.md in the current directory).
A GPU is never needed for the tests; this script is for machines that have one.
"""

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mend_jax import bench  # noqa: E402


def run_tests(timeout: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="", JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  t0 = time.time()
  try:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    tail = [l for l in proc.stdout.splitlines() if l.strip()][-1:] or ["(no output)"]
    out = {"rc": proc.returncode, "summary": tail[0], "wall_s": time.time() - t0}
    if proc.returncode != 0:
      out["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out
  except subprocess.TimeoutExpired:
    return {"rc": 124, "summary": f"stopped after {timeout} s", "wall_s": time.time() - t0}


def device_line() -> str:
  code = "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}')"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  return proc.stdout.strip() or proc.stderr.strip()[-300:]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="gpu.md")
  ap.add_argument("--no-tests", action="store_true")
  ap.add_argument("--test-timeout", type=int, default=420)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--algs", default="mend,enn,ke,ft")
  ap.add_argument("--platform", default="", help="JAX platform of the benchmarks (default: JAX's choice)")
  args = ap.parse_args()
  lines = [f"Device: {device_line()}; host {platform.node() or '?'}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.",
           "", "`python scripts/gpu_check.py" + (" --no-tests" if args.no_tests else "") + "`", ""]
  if not args.no_tests:
    print("tests ...", flush=True)
    t = run_tests(args.test_timeout)
    lines += [f"Tests: exit {t['rc']}, {t['summary']}, {t['wall_s']:.0f} s.", ""]
    if "log_tail" in t:
      lines += ["```", t["log_tail"], "```", ""]
    print(lines[-2] if "log_tail" not in t else t["log_tail"], flush=True)
  lines += ["| editor | model | dtype | train step s | edit s | floor s | compile s: step, edit | device peak GB |",
            "|---|---|---|---|---|---|---|---|"]
  jobs = [(alg, 6, 768, False) for alg in args.algs.split(",") if alg] + [("mend", 24, 768, False),
                                                                             ("mend", 24, 768, True)]
  for alg, n_layer, width, cached in jobs:
    for dtype in ("float32", "bfloat16"):
      size = f"{n_layer}x{width}" + (", cached" if cached else "")
      print(f"[{alg} {size} {dtype}] ...", flush=True)
      try:
        r = bench.run_child(alg, 1, args.reps, n_layer, width, dtype, platform=args.platform, cached=cached)
      except RuntimeError as e:
        lines.append(f"| {alg} | {size} | {dtype} | failed: {str(e).splitlines()[-1][:120]} | | | | |")
        continue
      step = f"{r['train_step_s']:.4f}" if "train_step_s" in r else "-"
      comp = (f"{r['train_step_compile_s']:.1f}" if "train_step_compile_s" in r else "-") + f", {r['edit_compile_s']:.1f}"
      peak = f"{r['device_peak_gb']:.2f}" if "device_peak_gb" in r else f"{r['peak_gb']:.2f} (host)"
      lines.append(f"| {alg} | {size} | {dtype} | {step} | {r['edit_s']:.4f} | {r['floor_s']:.4f} | {comp} "
                   f"| {peak} |")
      print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
