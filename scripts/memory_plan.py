"""How much memory training an editor needs for 6-11B models, without the models: the jitted
training step compiled for abstract arrays of their shapes, and XLA's own memory analysis.

  python scripts/memory_plan.py [--models gptj-6b,llama2-7b,t5-xxl] [--algs mend,enn,ke]
                                [--devices 1,8] [--dtypes float32,bfloat16] [--out docs/memory_plan.md]

For each (model, editor, base-model dtype, devices): the MEND / ENN / KE training step of
`mend_jax.train` (Adam, one edit, one paraphrase and one locality example of 32 tokens per
micro-batch, the paper's editable layers: the MLP matrices of the last 3 blocks; MEND rank 1920)
is lowered with jax.ShapeDtypeStruct inputs (no weights exist) and compiled; the table gives the
bytes one device holds by XLA's analysis: arguments (base model, editor state, batch), outputs,
temporaries, and the peak (arguments + outputs - donated aliases + temporaries). On 8 devices the
base model is split over an fsdp axis of 8 by `mend_jax.sharding.RULES` and the editor's state
(for ENN: its trained copy of the model) over the same axis; the devices are simulated CPU
devices, and the analysis is XLA's CPU compiler's (a GPU compiler's buffer assignment differs
somewhat). A figure like the paper's Figure 4 is written beside --out.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mend_jax import editors, models, report, sharding, train, tree  # noqa: E402
from mend_jax.data.batches import read_positions  # noqa: E402

GB = 1024 ** 3
# Published shapes (position tables shortened: only 32-token sequences are compiled, and the
# Llama-family classes build a positions^2 causal mask).
CONFIGS = {
    "gptj-6b": lambda: tf.GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=256,
                                     vocab_size=50400),
    "llama2-7b": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                        max_position_embeddings=256),
    "t5-xxl": lambda: tf.T5Config(d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64, d_kv=64,
                                  vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
EDITOR_CFG = {"mend": {"rank": 1920}, "enn": {}, "ke": {}}


def abstract_batch(model, n: int = 1, t: int = 32, n_lab: int = 8) -> dict:
  """ShapeDtypeStructs of one edit / locality batch of the model's task (values do not matter)."""
  ids = np.ones((n, t), np.int32)
  if model.task == "seq2seq":
    labels = np.ones((n, n_lab), np.int32)
    b = {"input_ids": ids, "attention_mask": ids, "decoder_input_ids": labels, "decoder_attention_mask": labels,
         "labels": labels}
    b["read_pos"], b["read_mask"] = read_positions(labels, seq2seq=True)
  else:
    labels = np.where(np.arange(t)[None] >= t - n_lab, ids, -100).astype(np.int32)
    b = {"input_ids": ids, "attention_mask": ids, "labels": labels}
    b["read_pos"], b["read_mask"] = read_positions(labels)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}


def plan(name: str, alg: str, dtype: str, n_devices: int) -> dict:
  model = models.abstract_model(CONFIGS[name](), dtype=dtype)
  editor = editors.make(alg, model, EDITOR_CFG[alg])
  cfg = train.TrainConfig(n_edits=1, n_loc=1, accumulate=10)
  tx = train.make_optimizer(cfg, editor)
  params = model.params
  state = train.state_shapes(editor, tx, 0, params)
  edit = abstract_batch(model)
  batch = {"edit": edit, "equiv": edit, "loc": edit}
  mesh = None
  if n_devices > 1:
    mesh = sharding.make_mesh(1, n_devices)
    params = sharding.shard_params(model, params, mesh)
    state = sharding.place(state, sharding.state_shardings(state, mesh, shard_editor=True))
    batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                                   batch)
  step = train.make_train_step(editor, cfg, None, mesh, n_devices > 1)
  t0 = time.time()
  compiled = step.lower(state, params, batch).compile()
  m = compiled.memory_analysis()
  args, out, temp, alias = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                            m.alias_size_in_bytes)
  return {"model": name, "alg": alg, "dtype": dtype, "devices": n_devices,
          "model_params": tree.num_elements(model.params), "editor_params": tree.num_elements(state.editor.params),
          "arguments_gb": args / GB, "outputs_gb": out / GB, "temp_gb": temp / GB, "alias_gb": alias / GB,
          "peak_gb": (args + out - alias + temp) / GB, "compile_s": time.time() - t0}


def table(rows) -> str:
  out = ["| model | editor | dtype | devices | model params | editor params | arguments GB | temporaries GB "
         "| outputs - donated GB | peak per device GB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['model']} | {r['alg']} | {r['dtype']} | {r['devices']} | {r['model_params'] / 1e9:.2f}B "
               f"| {r['editor_params'] / 1e6:,.0f}M | {r['arguments_gb']:.1f} | {r['temp_gb']:.1f} "
               f"| {r['outputs_gb'] - r['alias_gb']:.1f} | **{r['peak_gb']:.1f}** |")
  return "\n".join(out)


def figure(rows, path: str) -> str:
  plt = report.pyplot()
  groups = sorted({(r["dtype"], r["devices"]) for r in rows}, key=lambda g: (g[1], g[0] != "float32"))
  fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
  names = list(dict.fromkeys(r["model"] for r in rows))
  algs = list(dict.fromkeys(r["alg"] for r in rows))
  for ax, (dtype, n) in zip(axes[0], groups):
    for j, alg in enumerate(algs):
      vals = [next((r["peak_gb"] for r in rows if (r["model"], r["alg"], r["dtype"], r["devices"]) == (m, alg, dtype, n)),
                   0.0) for m in names]
      ax.bar(np.arange(len(names)) + (j - (len(algs) - 1) / 2) * 0.8 / len(algs), vals, 0.8 / len(algs), label=alg)
    ax.axhline(80, color="k", lw=0.8, ls="--")
    ax.axhline(40, color="gray", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_title(f"{dtype}, {n} device{'s' if n > 1 else ''}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("GB per device (training step)")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  return report.save_figure(fig, path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default=",".join(CONFIGS))
  ap.add_argument("--algs", default="mend,enn,ke")
  ap.add_argument("--devices", default="1,8")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--out", default=None, help="write the table here (markdown) and the figure beside it")
  ap.add_argument("--json", default=None, help="rows already in this file are reused; new rows are added as they "
                                                "are measured (ENN's steps take minutes each to compile)")
  ap.add_argument("--report-only", action="store_true", help="only the table and figure of the rows in --json")
  args = ap.parse_args()
  names = [] if args.report_only else [m for m in args.models.split(",") if m]
  if any(m not in CONFIGS for m in names):
    sys.exit(f"error: --models {args.models!r}: each must be one of {sorted(CONFIGS)}")
  algs = [a for a in args.algs.split(",") if a]
  if any(a not in EDITOR_CFG for a in algs):
    sys.exit(f"error: --algs {args.algs!r}: each must be one of {sorted(EDITOR_CFG)}")
  rows = []
  if args.report_only and not (args.json and os.path.isfile(args.json)):
    sys.exit("error: --report-only needs an existing --json file")
  if args.json and os.path.isfile(args.json):
    with open(args.json) as f:
      rows = json.load(f)
  key = lambda r: (r["model"], r["alg"], r["dtype"], r["devices"])
  done = {key(r) for r in rows}
  for name in names:
    for alg in algs:
      for dtype in args.dtypes.split(","):
        for n in (int(d) for d in args.devices.split(",")):
          if (name, alg, dtype, n) in done:
            continue
          print(f"[{name} {alg} {dtype} {n} device(s)] ...", flush=True)
          try:
            rows.append(plan(name, alg, dtype, n))
          except Exception as e:  # one configuration failing to compile is a result too
            print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
          r = rows[-1]
          print(f"  peak {r['peak_gb']:.1f} GB per device (arguments {r['arguments_gb']:.1f}, temporaries "
                f"{r['temp_gb']:.1f}); compiled in {r['compile_s']:.0f} s", flush=True)
          if args.json:
            report.write_json(args.json, rows)
  order = {m: i for i, m in enumerate(CONFIGS)}
  rows.sort(key=lambda r: (order.get(r["model"], 99), ["mend", "enn", "ke"].index(r["alg"]), r["devices"],
                           r["dtype"] != "float32"))
  text = table(rows)
  print(text)
  if args.out:
    fig = figure(rows, os.path.join(os.path.dirname(os.path.abspath(args.out)), "memory_plan.png"))
    report.atomic_write_text(args.out, "XLA's memory analysis of the training steps (`python scripts/memory_plan.py`; the "
                             f"commands and how to read it: docs/scale.md), {time.strftime('%Y-%m-%d')}.\n\n"
                             f"{text}\n\n![peak memory per device]({os.path.basename(fig)})\n")


if __name__ == "__main__":
  main()
