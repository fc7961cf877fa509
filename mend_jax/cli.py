"""The command line: mend-train, mend-evaluate, mend-edit, mend-bench (or `python -m mend_jax.cli
COMMAND ...`). Each command parses its flags and calls the library; this is the only module
that prints. A user error (bad config key or value, missing file, mismatched checkpoint) ends
with one `error:` line and exit status 2, never a traceback.

  mend-train --workdir runs/demo [--config zsre:t5-small | --config=path/to/config.py:variant]
             [--config.train.max_steps=500 ...]
  mend-evaluate --workdir runs/demo [--split test] [--k 1] [--ks 1,5,25,125]
  mend-edit --workdir runs/demo --prompt "The capital of X is" --target Y [--paraphrase ...]
  mend-bench [--algs mend,enn] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging as pylogging
import os
import sys
from typing import Callable, Mapping

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from mend_jax import bench, checkpoint, configs, editors, experiment, models, report
from mend_jax.configs import common

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- shared pieces
class _OwnInfo(pylogging.Filter):
  """INFO lines of this package only (Orbax and JAX log much at INFO); warnings from anywhere."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or record.pathname.startswith(_PKG_DIR)


class _LineHandler(pylogging.Handler):
  """One plain line per record on stderr, written around any progress bar (tqdm.write)."""

  def emit(self, record):
    tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
  """absl's handler (set by app.run) replaced by _LineHandler: INFO of this package, warnings."""
  root = pylogging.getLogger()
  root.removeHandler(logging.get_absl_handler())
  handler = _LineHandler()
  handler.setFormatter(pylogging.Formatter("%(message)s"))
  handler.addFilter(_OwnInfo())
  root.addHandler(handler)
  logging.set_verbosity(logging.INFO)


def _run(fn: Callable[[], object]) -> object:
  """Runs fn(); user errors end with one clear line and exit status 2."""
  try:
    return fn()
  except (ValueError, KeyError, TypeError, OSError) as e:  # OSError: missing, unwritable or misplaced files
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing with one clear line (exit 2) for an unknown or malformed flag or override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config")]
    print(f"error: bad config {bad}: {e}", file=sys.stderr)
    sys.exit(2)


def _show_in_help(argv0: str, doc: str, names: list[str]) -> None:
  """--help lists these flags under this usage text (absl shows the key flags of sys.argv[0]
  and __main__'s docstring)."""
  sys.argv[0] = argv0
  for name in names:
    flags.FLAGS.register_key_flag_for_module(argv0, flags.FLAGS[name])
  sys.modules["__main__"].__doc__ = doc


def _config_from_argv(argv: list[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Loads the config that --config names (default: the packaged synthetic config) and returns it
  with argv minus that flag. NAME[:variant] is a packaged config (synthetic, zsre, fever,
  wikitext) or a Python file with get_config(arg=None). Raises ValueError naming the problem."""
  value, rest, i = "synthetic", [argv[0]], 1
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      value, i = argv[i + 1], i + 2
      continue
    if a.startswith("--config="):
      value = a[len("--config="):]
    else:
      rest.append(a)
    i += 1
  name, _, variant = value.partition(":")
  path = configs.path(name) if name in configs.NAMES and not os.path.exists(name) else name
  if not os.path.isfile(path):
    raise ValueError(f"--config {value!r}: no such file, and not one of the packaged configs {configs.NAMES}")
  spec = importlib.util.spec_from_file_location(f"mend_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: say which, in one line
    raise ValueError(f"--config {value!r}: {path} could not be loaded ({type(e).__name__}: {e})") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"--config {value!r}: {path} has no get_config()")
  cfg = module.get_config(variant) if variant else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ValueError(f"--config {value!r}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
  return cfg, rest


class _Progress:
  """A tqdm bar per phase (pretraining, training), fed by the library's progress callbacks."""

  def __init__(self):
    self.bar = None
    self.last = 0

  def __call__(self, step: int, total: int, row: Mapping[str, float]) -> None:
    if self.bar is None or self.bar.total != total or step < self.last:
      self.close()
      self.bar = tqdm(total=total, initial=step - 1, dynamic_ncols=True)
    self.bar.update(step - self.last if step > self.last else 1)
    self.last = step
    shown = {k: f"{row[k]:.3f}" for k in ("loss", "edit_success", "loc_agree") if k in row}
    if shown:
      self.bar.set_postfix(shown, refresh=False)
    if step >= total:
      self.close()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
      self.last = 0


def _print_edit(shown: Mapping) -> None:
  print(f"\nEdit: {shown['prompt']!r} -> {shown['target']!r}   (loss before {shown['loss_before']:.3f})")
  print(f"{'':12s} {'prompt':45s} {'before':>14s} {'after':>14s}")
  for r in shown["rows"]:
    print(f"{r['kind']:12s} {r['prompt'][:45]:45s} {r['before']:>14s} {r['after']:>14s}")


def _print_results(res: Mapping) -> None:
  keys = ("edit_success", "reliability", "locality_acc_pre", "locality_acc_post", "locality_drawdown",
          "locality_unchanged", "locality_protected", "ppl_pre", "ppl_post", "time_per_edit_s")
  print("results on the %s split (%d edits): %s" % (res.get("split", "test"), res.get("n_test_edits", 0), ", ".join(
      f"{k}={res[k]:.4f}" for k in keys if isinstance(res.get(k), (int, float)))))


def _stored_config(workdir: str):
  """The experiment config saved with the checkpoint in `workdir`."""
  meta = checkpoint.read_meta(workdir)
  if "config" not in meta:
    raise ValueError(f"the checkpoint in {workdir!r} has no stored experiment config")
  return common.from_stored(meta["config"])


# ---------------------------------------------------------------------------- commands
TRAIN_USAGE = """Trains an editor (or, for FT, saves it), evaluates its best checkpoint on the test split,
writes WORKDIR/results.json and shows one edit. Rerunning the same command resumes.

  mend-train --workdir runs/demo                       (the offline demo: --config synthetic)
  mend-train --workdir runs/z --config zsre:t5-small --config.alg=enn --config.train.max_steps=500
"""
EVALUATE_USAGE = """Evaluates the editor saved in WORKDIR on a split: batched edits, k at once
(eval_SPLIT_kK[_nN][_stepsS][_protectP_preserveG].json; training's results.json is left as it
was), or with --ks a sweep of batched and sequential editing (results_k.json, results_k.md,
k_sweep.png).

  mend-evaluate --workdir runs/demo [--split test] [--k 1] [--n 200]
  mend-evaluate --workdir runs/demo --ks 1,5,25,125
  mend-evaluate --workdir runs/demo --stream --k 10 --n 480         (lifelong editing)
  mend-evaluate --workdir runs/ls_k125 --k 125 --edit_steps 3         (MEND applied 3 times per edit)
  mend-evaluate --workdir runs/ls_k125 --k 125 --refine 50           (then 50 FT+KL steps per edit)
  mend-evaluate --workdir runs/ls_k125 --k 125 --protect val --preserve 30
                      (least squares: keep the val split's facts; adds locality_protected)
"""
EDIT_USAGE = """Applies one edit with the editor saved in WORKDIR and prints greedy answers before and after.

  mend-edit --workdir runs/demo --prompt "The capital of X is" --target Y [--paraphrase "X's capital is"]
"""

def train(argv: list[str] | None = None) -> None:
  """mend-train: train (or, for FT, save) an editor, evaluate it, show one edit."""
  argv = sys.argv if argv is None else argv
  try:
    cfg, argv = _config_from_argv(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.argv = argv  # ml_collections applies --config.a.b overrides from sys.argv as it defines the flag
  try:
    config = config_flags.DEFINE_config_dict("config", cfg, "experiment config; override fields with --config.a.b=value")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: bad config override {bad}: {str(e).strip(chr(34))} (unknown key or wrong type)", file=sys.stderr)
    sys.exit(2)
  workdir = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics, results)", required=True)
  _show_in_help(argv[0], TRAIN_USAGE, ["config", "workdir"])

  def main(_):
    _setup_logging()

    def run():
      progress = _Progress()
      res = experiment.train_and_evaluate(config.value, workdir.value, progress=progress)
      progress.close()
      _print_results(res)
      print("wrote", os.path.join(workdir.value, "results.json"))
      if config.value.eval.show_edit:
        task = experiment.prepare(config.value)
        _print_edit(experiment.show_edit(workdir.value, task, task.test.records[0]))

    _run(run)

  app.run(main, argv=argv, flags_parser=_parse_flags)


def evaluate(argv: list[str] | None = None) -> None:
  """mend-evaluate: evaluate a trained editor on a split (batched, or a k sweep)."""
  workdir = flags.DEFINE_string("workdir", None, "work directory holding the checkpoints", required=True)
  split = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "which split's edits")
  k = flags.DEFINE_integer("k", 1, "edits applied at once (batched editing)")
  n = flags.DEFINE_integer("n", -1, "number of edits (-1: the whole split)")
  ks = flags.DEFINE_list("ks", [], "comma-separated k values: batched and sequential sweep")
  seq = flags.DEFINE_bool("sequential", True, "with --ks: also evaluate sequential editing")
  stream = flags.DEFINE_bool("stream", False, "lifelong editing: the split's first --n edits as one stream, --k at a "
                             "time, retained success and locality along it (results_stream.json, stream.png)")
  every = flags.DEFINE_integer("every", 10, "with --stream: batches between measurements")
  steps = flags.DEFINE_integer("edit_steps", 0, "MEND: apply the editor this many times per edit, each on the "
                               "weights the step before left (0: as it was trained)")
  refine = flags.DEFINE_integer("refine", 0, "MEND: after each edit, this many FT+KL steps on the edited matrices "
                                "(locality examples from the training split; 0: as it was trained)")
  protect = flags.DEFINE_enum("protect", None, ["train", "val", "test"], "least-squares MEND: keep this split's "
                              "facts, the preservation term re-measured on its locality examples (no retraining); "
                              "adds locality_protected")
  preserve = flags.DEFINE_float("preserve", None, "with --protect: the term's gamma (default: as trained)")
  argv = sys.argv if argv is None else argv
  _show_in_help(argv[0], EVALUATE_USAGE, ["workdir", "split", "k", "n", "ks", "sequential", "stream", "every",
                                          "edit_steps", "refine", "protect", "preserve"])

  def main(_):
    _setup_logging()

    def run():
      if k.value < 1:
        raise ValueError(f"--k must be >= 1 (edits applied at once), got {k.value}")
      if n.value == 0 or n.value < -1:
        raise ValueError(f"--n must be -1 (the whole split) or >= 1, got {n.value}")
      if (protect.value or preserve.value is not None) and (stream.value or ks.value):
        raise ValueError("--protect and --preserve apply to batched evaluation (--k), not to --stream or --ks")
      experiment.check_protect(split.value, protect.value, preserve.value)
      config = _stored_config(workdir.value)
      config.eval.n_test = n.value
      config.eval.edit_steps = steps.value
      config.eval.refine = refine.value
      if stream.value:
        res = experiment.evaluate_stream_workdir(config, workdir.value, split=split.value, k=k.value,
                                                 every=every.value)
        print(report.stream_table(res))
        print("wrote", os.path.join(workdir.value, f"results_stream{experiment.steps_suffix(config)}.json"))
        return
      if ks.value:
        try:
          k_list = [int(x) for x in ks.value]
        except ValueError:
          raise ValueError(f"--ks must be comma-separated integers, got {','.join(ks.value)!r}") from None
        res = experiment.evaluate_k_sweep(config, workdir.value, split=split.value, ks=k_list, sequential=seq.value)
        print(report.ks_table(res))
        print("wrote", os.path.join(workdir.value, f"results_k{experiment.steps_suffix(config)}.json"))
        return
      res = experiment.evaluate_workdir(config, workdir.value, split=split.value, k=k.value, protect=protect.value,
                                        preserve=preserve.value)
      # Its own file: results.json holds the training run's results and stays as it was.
      name = (f"eval_{split.value}_k{k.value}" + (f"_n{n.value}" if n.value > 0 else "")
              + experiment.steps_suffix(config)
              + (f"_protect{protect.value}_preserve{res['preserve']:g}" if protect.value else "") + ".json")
      path = report.write_json(os.path.join(workdir.value, name), res)
      _print_results(res)
      print("wrote", path)

    _run(run)

  app.run(main, argv=argv, flags_parser=_parse_flags)


def edit(argv: list[str] | None = None) -> None:
  """mend-edit: apply one edit with a trained editor and show answers before and after."""
  workdir = flags.DEFINE_string("workdir", None, "work directory holding the checkpoints", required=True)
  prompt = flags.DEFINE_string("prompt", None, "edit prompt x_e", required=True)
  target = flags.DEFINE_string("target", None, "new answer y_e", required=True)
  para = flags.DEFINE_string("paraphrase", None, "a paraphrase of the prompt (default: the prompt)")
  unrel = flags.DEFINE_string("unrelated", None, "an unrelated prompt (default: one from the test split)")
  argv = sys.argv if argv is None else argv
  _show_in_help(argv[0], EDIT_USAGE, ["workdir", "prompt", "target", "paraphrase", "unrelated"])

  def main(_):
    _setup_logging()

    def run():
      config = _stored_config(workdir.value)
      task = experiment.prepare(config)
      other = task.test.records[0]
      record = {"src": prompt.value, "alt": target.value, "rephrase": para.value or prompt.value,
                "loc": unrel.value or other["loc"], "loc_ans": other["loc_ans"] if not unrel.value else "-"}
      _print_edit(experiment.show_edit(workdir.value, task, record))

    _run(run)

  app.run(main, argv=argv, flags_parser=_parse_flags)


def bench_main(argv: list[str] | None = None) -> None:
  """mend-bench: speed and memory of every editor (see mend_jax.bench)."""
  ap = argparse.ArgumentParser(prog="mend-bench", description=bench.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--algs", default="mend", help="comma-separated editors: mend, enn, ke, ft, ft_kl")
  ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--layers", type=int, default=6, help="GPT-2 blocks (default 6)")
  ap.add_argument("--width", type=int, default=768, help="GPT-2 width (default 768)")
  ap.add_argument("--out", default=None, help="append the tables to this markdown file")
  ap.add_argument("--json", default=None, help="write the raw results to this JSON file")
  ap.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES), help="the base model's dtype")
  ap.add_argument("--cached", action="store_true",
                  help="batches carry cached frozen activations: only the edited blocks and the head run")
  ap.add_argument("--official", default=None,
                  help="the JSON of ../shared/anchors/official_mend_bench.py --json from the same run: its medians "
                       "are shown beside the matching rows")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure, write JSON here
  args = ap.parse_args((sys.argv if argv is None else argv)[1:])
  if args.child:
    report.write_json(args.child, bench.measure(args.algs, args.reps, args.layers, args.width, args.dtype, args.cached))
    return
  alg_list = [a.strip() for a in args.algs.split(",") if a.strip()]
  if not alg_list or any(a not in editors.NAMES for a in alg_list):
    sys.exit(f"error: --algs {args.algs!r}: each must be one of {editors.NAMES}")
  try:
    threads = [int(t) for t in args.threads.split(",")]
  except ValueError:
    sys.exit(f"error: --threads must be comma-separated integers, got {args.threads!r}")
  if any(t < 1 or t > os.cpu_count() for t in threads):
    sys.exit(f"error: --threads {threads}: each must be between 1 and this machine's {os.cpu_count()} cores")
  if args.reps < 1 or args.layers < 1 or args.width < 64 or args.width % 64:
    sys.exit("error: --reps and --layers must be >= 1, --width a multiple of 64")
  try:
    official = bench.load_official(args.official) if args.official else None
  except ValueError as e:
    sys.exit(f"error: {e}")
  results = []
  for alg in alg_list:
    for n in threads:
      print(f"[{alg}, {n} thread(s), GPT-2 {args.layers}x{args.width}] ...", flush=True)
      try:
        results.append({**bench.run_child(alg, n, args.reps, args.layers, args.width, args.dtype, cached=args.cached),
                        "threads": n})
      except RuntimeError as e:
        sys.exit(f"error: {e}")
  text = bench.table(results, official) + "\n\n" + bench.bound_table(results, official)
  print(text)
  if args.json:
    report.write_json(args.json, results)
  if args.out:
    head = bench.heading(args.algs, args.threads, args.reps, args.layers, args.width, args.dtype, args.cached,
                         args.official)
    with open(args.out, "a") as f:
      f.write(f"\n{head}\n\n{text}\n")


COMMANDS = {"train": train, "evaluate": evaluate, "edit": edit, "bench": bench_main}


def main() -> None:
  """python -m mend_jax.cli COMMAND [flags]."""
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: python -m mend_jax.cli {{{','.join(COMMANDS)}}} [flags]", file=sys.stderr)
    sys.exit(2)
  name = sys.argv[1]
  COMMANDS[name]([f"mend-{name}"] + sys.argv[2:])


if __name__ == "__main__":
  main()
