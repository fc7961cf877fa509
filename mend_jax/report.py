"""What runs leave on disk: atomic file writes, result tables and plots.

Every file the project writes goes through `atomic_write_text` (or `write_json`): the text goes
to a temporary file in the same directory, which is renamed over the target, so a crash never
leaves half a file. Plots are written the same way.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import numpy as np


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
  """Writes `text` (UTF-8) to `path` through a temporary file and a rename. Creates the parent
  directory. Returns the path as a string."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shareable files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def json_safe(obj: Any) -> Any:
  """`obj` with what strict JSON cannot hold made plain: non-finite floats become None (null),
  numpy scalars and arrays Python numbers and lists, tuples lists."""
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray) or (hasattr(obj, "shape") and hasattr(obj, "dtype") and not isinstance(obj, str)):
    return json_safe(np.asarray(obj).tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(float(obj)) else None
  return obj


def dumps(obj: Any, indent: int | None = None) -> str:
  """Strict JSON text of `obj` (json_safe first; sorted keys)."""
  return json.dumps(json_safe(obj), indent=indent, sort_keys=True, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
  """`obj` as strict JSON (`dumps`) at `path`, atomically. Returns the path."""
  return atomic_write_text(path, dumps(obj, indent) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The JSON objects of a JSON-lines file (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def filter_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
  """Rewrites a JSON-lines file (atomically) with only the rows `keep` accepts. Returns the number
  of rows dropped; a missing file is left missing."""
  if not os.path.isfile(path):
    return 0
  rows = read_jsonl(path)
  kept = [r for r in rows if keep(r)]
  if len(kept) != len(rows):
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in kept))
  return len(rows) - len(kept)


def pyplot():
  """matplotlib.pyplot with the non-interactive Agg backend (imported on first use)."""
  import matplotlib  # optional at import time: only plots need it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
  """Saves a figure atomically (PNG: a temporary file renamed into place), closes it, returns path."""
  plt = pyplot()
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=dpi)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def plot_metrics(rows: list[Mapping], path: str) -> str:
  """Training loss, edit success and locality agreement against step (train rows: those with
  "loss"; validation rows: those with "val/loss"), as a PNG at `path`. Returns path."""
  plt = pyplot()
  train_rows = [r for r in rows if "loss" in r]
  val_rows = [r for r in rows if "val/loss" in r]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  for ax, key, title in zip(axes, ("loss", "edit_success", "loc_agree"),
                            ("loss", "edit success (paraphrase)", "locality agreement")):
    ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], label="train")
    ax.plot([r["step"] for r in val_rows], [r["val/" + key] for r in val_rows], "o-", label="validation")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  save_figure(fig, path, dpi=80)
  return path


def ks_table(results: dict) -> str:
  """A markdown table of evaluate_ks results."""
  ppl = any("ppl_drawdown" in r for mode in results.values() for r in mode.values())
  head = "| mode | k | edits | edit success | reliability | locality pre | locality post | drawdown |"
  head += " ppl pre -> post |" if ppl else ""
  head += " time/edit ms |"
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for mode in ("batched", "sequential"):
    for k, r in sorted(results.get(mode, {}).items(), key=lambda kv: int(kv[0])):
      row = (f"| {mode} | {k} | {r['n_test_edits']} | {r['edit_success']:.3f} | {r['reliability']:.3f} "
             f"| {r['locality_acc_pre']:.3f} | {r['locality_acc_post']:.3f} | {r['locality_drawdown']:.3f} |")
      if ppl:
        row += f" {r['ppl_pre']:.2f} -> {r['ppl_post']:.2f} |" if "ppl_pre" in r else " |"
      row += f" {1000 * r['time_per_edit_s']:.1f} |"
      rows.append(row)
  return "\n".join(rows)


def plot_ks(results: dict, path: str, title: str = "") -> str:
  """Edit success and locality drawdown against k, batched and sequential (log-scale k), as a PNG
  at `path` (written atomically). Returns path."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for mode, style in (("batched", "o-"), ("sequential", "s--")):
    rs = sorted(results.get(mode, {}).items(), key=lambda kv: int(kv[0]))
    if not rs:
      continue
    ks = [int(k) for k, _ in rs]
    axes[0].plot(ks, [r["edit_success"] for _, r in rs], style, label=mode)
    axes[1].plot(ks, [r["locality_drawdown"] for _, r in rs], style, label=mode)
  for ax, name in zip(axes, ("edit success (paraphrases)", "locality drawdown")):
    ax.set_xscale("log")
    ax.set_xlabel("k edits")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path, dpi=120)
  return path


def stream_table(res: dict) -> str:
  """A markdown table of an `evaluate.evaluate_stream` result: one row per measurement."""
  rows = [f"| edits (k={res['k']}) | retained edit success | retained reliability | locality unchanged "
          "| locality drawdown |", "|---|---|---|---|---|"]
  for r in res["curve"]:
    rows.append(f"| {r['edits']} | {r['edit_success']:.3f} | {r['reliability']:.3f} | {r['locality_unchanged']:.3f} "
                f"| {r['locality_drawdown']:.3f} |")
  return "\n".join(rows)


def plot_stream(results: dict, path: str, title: str = "") -> str:
  """Retained edit success and locality along lifelong-editing streams ({label: evaluate_stream
  result}), as a PNG at `path` (written atomically). Returns path."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for i, (label, res) in enumerate(results.items()):
    x, color = [r["edits"] for r in res["curve"]], f"C{i % 10}"  # one colour per stream in both panels
    axes[0].plot(x, [r["edit_success"] for r in res["curve"]], "o-", color=color, label=f"{label} paraphrase")
    axes[0].plot(x, [r["reliability"] for r in res["curve"]], "s--", color=color, label=f"{label} edit prompt")
    axes[1].plot(x, [r["locality_unchanged"] for r in res["curve"]], "o-", color=color, label=label)
  axes[0].set_title("retained success of all edits so far")
  axes[1].set_title("locality: predictions unchanged")
  for ax in axes:
    ax.set_xlabel("edits applied")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path, dpi=120)
  return path
