"""From a config to a trained, evaluated, saved editor: what the command-line scripts call.

Config layout (see configs/synthetic_demo.py): seed, task, cache_dir, world, pretrain, model
(name_or_path, editable), data (max_len), editor (EditorConfig fields), train (TrainConfig fields),
eval (n_test, k, show_edit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from mend_jax import algs as algs_lib
from mend_jax import checkpoint as ckpt_lib
from mend_jax import evaluate as eval_lib
from mend_jax import train as train_lib
from mend_jax.data import EditData
from mend_jax.editor import EditorConfig
from mend_jax.mend import MEND
from mend_jax.models import EditableModel, load_model

TASKS = ("synthetic", "zsre", "fever", "wikitext")


@dataclasses.dataclass
class Task:
  model: EditableModel
  tokenizer: Any
  train: EditData
  val: EditData
  test: EditData


def build_dataclass(cls, overrides: Mapping, name: str):
  """cls(**overrides) with a clear error naming unknown keys (as name.key)."""
  return algs_lib.build_config(cls, dict(overrides), name)


def _plain(cfg) -> dict:
  return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else json.loads(json.dumps(cfg))


def prepare(config) -> Task:
  """Builds (and caches) the data and base model that `config` names."""
  if config.task not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")
  if config.task != "synthetic":
    return _prepare_paper(config)
  from mend_jax import pretrain as pretrain_lib
  from mend_jax import synthetic

  cache = os.path.abspath(config.cache_dir)
  world_cfg = build_dataclass(synthetic.WorldConfig, config.world, "world")
  paths = synthetic.write_benchmark(os.path.join(cache, "data"), world_cfg)
  data_dir = os.path.dirname(str(paths["train"]))
  model_dir = config.model.name_or_path
  if not model_dir:
    pcfg = build_dataclass(pretrain_lib.PretrainConfig, config.pretrain, "pretrain")
    model_dir = str(pretrain_lib.pretrain(data_dir, os.path.join(cache, "model"), pcfg))
  import transformers

  editable = tuple(config.model.editable) or None
  model = load_model(model_dir, editable=editable)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  max_len = int(config.data.max_len)
  if model.max_length is not None and max_len > model.max_length:
    raise ValueError(f"data.max_len={max_len} exceeds the model's context of {model.max_length}")
  split = lambda s: EditData.from_records(synthetic.load_records(paths[s]), tokenizer, max_len, name=str(paths[s]))
  return Task(model, tokenizer, split("train"), split("val"), split("test"))


def _data_path(config, key: str) -> str:
  path = str(config.data.get(key, "") or "")
  if path and not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.{key}={path!r} does not exist (see the config's docstring for "
                            "where the official data files go)")
  return path


def _load_paper_records(config):
  """(train, val, test) record lists of a paper task, and the NQ pairs (zsRE) or None.

  test = the official dev/valid file (what the paper reports); val = the last train.n_val rows of
  the train file, held out from training for early stopping, so model selection never sees test."""
  from mend_jax import datasets as ds_lib

  d, seed = config.data, int(config.seed)
  cache = os.path.join(os.path.abspath(config.cache_dir), "hf_datasets")
  train_path, dev_path = _data_path(config, "train_path"), _data_path(config, "dev_path")
  nq = None
  if config.task == "zsre":
    train, test = (ds_lib.load_zsre(p, seed, cache_dir=cache) for p in (train_path, dev_path))
    if _data_path(config, "nq_path"):
      nq = ds_lib.load_nq(d.nq_path, cache_dir=cache)
      print(nq.summary())
  elif config.task == "fever":
    train, test = (ds_lib.load_fever(p, seed, cache_dir=cache) for p in (train_path, dev_path))
  else:
    min_words = int(d.get("min_words", 50))
    loc_train = ds_lib.load_texts(_data_path(config, "loc_train_path"), min_words, cache_dir=cache)
    loc_val = (ds_lib.load_texts(_data_path(config, "loc_val_path"), min_words, cache_dir=cache)
               if d.get("loc_val_path") else loc_train)
    for loaded in {id(x): x for x in (loc_train, loc_val)}.values():
      print(loaded.summary())
    train = ds_lib.load_wiki_edits(train_path, loc_train.records, seed, cache_dir=cache)
    test = ds_lib.load_wiki_edits(dev_path, loc_val.records, seed, cache_dir=cache)
  for loaded in (train, test):
    print(loaded.summary())
  n_val = int(config.train.n_val)
  if not 0 < n_val < len(train):
    raise ValueError(f"train.n_val={n_val} validation edits are held out of {train.path!r}, which has "
                     f"{len(train)} usable records; need 0 < n_val < {len(train)}")
  records = train.records
  val = [dict(r) for r in records[-n_val:]]
  if config.task == "wikitext":  # validation edits take their locality from the validation texts
    import numpy as np

    order = np.random.default_rng([seed, 17]).permutation(len(loc_val.records))
    for i, r in enumerate(val):
      r["loc"] = loc_val.records[order[i % len(order)]]
  return records[:-n_val], val, test.records, (nq.records if nq is not None else None)


def _paper_model(config, texts):
  """(EditableModel, tokenizer): pretrained by name/path, or with config.tiny a tiny random model
  of the same family and a tokenizer trained on `texts`."""
  import transformers

  from mend_jax import models as models_lib
  from mend_jax import paper

  editable = tuple(config.model.editable) or None
  max_len = int(config.data.max_len)
  if config.get("tiny", False):
    family = str(config.model.family)
    tokenizer = paper.tiny_tokenizer(family, texts)
    hf_cfg = paper.tiny_hf_config(family, tokenizer, max_len, config.model.get("tiny", None))
    model = models_lib.model_from_config(hf_cfg, editable=editable, seed=int(config.seed))
  else:
    model = load_model(config.model.name_or_path, editable=editable)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.get("tokenizer") or config.model.name_or_path)
  if tokenizer.pad_token is None and tokenizer.eos_token is not None:
    # GPT tokenizers have no pad token: pad with eos. Padded positions are masked by attention_mask
    # and labels everywhere, so unlike the official code no embedding row needs to be added.
    tokenizer.pad_token = tokenizer.eos_token
  if model.max_length is not None and max_len > model.max_length:
    raise ValueError(f"data.max_len={max_len} exceeds the model's context of {model.max_length}")
  return model, tokenizer


def _prepare_paper(config) -> Task:
  """prepare() for the paper's tasks (zsre, fever, wikitext); paths from config.data."""
  from mend_jax import datasets as ds_lib
  from mend_jax import paper

  train, val, test, nq = _load_paper_records(config)
  model, tokenizer = _paper_model(config, paper.record_texts(train + val + test + [
      {"loc": q, "loc_ans": a} for q, a in (nq or [])[:2000]]))
  task = paper.DATA_TASK[config.task]
  expected = "causal_lm" if task == "generation" else task
  if model.task != expected:
    raise ValueError(f"config.task={config.task!r} needs a {expected} model; {config.model.name_or_path!r} "
                     f"is a {model.task} model ({model.family.name})")
  max_len, seed = int(config.data.max_len), int(config.seed)
  if nq is not None:
    # NQ answers that do not fit the decoder (with eos) are left out rather than truncated.
    fits = [(q, a) for q, a in nq if len(tokenizer.encode(a, add_special_tokens=False)) + 1 <= max_len]
    if len(fits) < len(nq):
      print(f"NQ: {len(nq) - len(fits)} pairs with answers longer than data.max_len={max_len} left out")
    ds_lib.pair_locality(val, fits, seed, "validation")
    ds_lib.pair_locality(test, fits, seed + 1, "test")
  dec = getattr(model.config, "decoder_start_token_id", None)
  build = lambda recs, name: EditData.from_records(recs, tokenizer, max_len, name=name, task=task,
                                                   decoder_start_id=dec, seed=seed)
  return Task(model, tokenizer, build(train, f"{config.task} train"), build(val, f"{config.task} validation"),
              build(test, f"{config.task} test"))


def alg_name(config) -> str:
  name = str(config.get("alg", "mend"))
  if name not in algs_lib.ALGS:
    raise ValueError(f"config.alg must be one of {algs_lib.ALGS}, got {name!r}")
  return name


def make_editor(config, model: EditableModel):
  """The editor config.alg names ("mend" by default), configured by config.editor for MEND and by
  config.<alg> (e.g. config.enn) for the baselines; unknown keys raise a clear error."""
  name = alg_name(config)
  if name == "mend":
    return MEND(model, build_dataclass(EditorConfig, config.editor, "editor"))
  return algs_lib.make_alg(name, model, dict(config.get(name, None) or {}))


def num_params(editor, base_params) -> int:
  """Trained parameters of a learned editor (ENN: the whole model plus its inner lrs); 0 for FT."""
  shapes = jax.eval_shape(editor.init, jax.random.PRNGKey(0), base_params)
  return int(sum(x.size for x in jax.tree_util.tree_leaves(shapes.params)))


def with_loc_pool(editor, state, data: EditData, max_rows: int = 1000):
  """FT+KL samples locality examples during each edit: give it the training split's."""
  if not getattr(editor, "needs_loc_pool", False):
    return state
  idx = np.arange(min(len(data), max_rows))
  return editor.with_loc_pool(state, data.loc.take(idx))


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
  """Trains a learned editor (resuming from workdir if a checkpoint is there) or, for FT / FT+KL,
  saves their (untrained) state; evaluates the best one on the test split, writes
  workdir/results.json and returns the results."""
  t0 = time.time()
  tcfg = build_dataclass(train_lib.TrainConfig, config.train, "train")
  task = prepare(config)
  editor = make_editor(config, task.model)
  print(f"base model: {task.model.family.name}, editing {len(task.model.layers)} layers "
        f"{[l.path for l in task.model.layers]}; {editor.name} parameters: "
        f"{num_params(editor, task.model.params):,}")
  if editor.learned:
    _, summary = train_lib.fit(editor, tcfg, task.model.params, task.train, task.val, workdir,
                               seed=int(config.seed), meta={"config": _plain(config)}, progress=progress)
  else:
    summary = ckpt_lib.save_untrained(editor, task.model.params, workdir, int(config.seed),
                                      {"config": _plain(config)})
  results = evaluate_workdir(config, workdir, task=task)
  results.update(summary)
  results["editor_params"] = num_params(editor, task.model.params)
  results["total_time_s"] = time.time() - t0
  write_results(workdir, results)
  try:
    plot_metrics(workdir)
  except Exception as e:  # a plot is a convenience; never lose the results over it
    print(f"(could not plot metrics: {e})")
  if config.eval.show_edit:
    show_edit(workdir, task, task.test.records[0])
  return results


def evaluate_workdir(config, workdir: str, task: Task | None = None, split: str = "test",
                     k: int | None = None) -> dict:
  task = task or prepare(config)
  loaded = ckpt_lib.load_editor(workdir, task.model)
  data = getattr(task, split)
  n = int(config.eval.n_test) if int(config.eval.n_test) > 0 else None
  state = with_loc_pool(loaded.alg, loaded.state, task.train)
  res = eval_lib.evaluate(loaded.alg, state, task.model.params, data, n_edits=n, k=int(k or config.eval.k))
  res["alg"] = loaded.alg.name
  res["split"] = split
  res["checkpoint_step"] = int(loaded.meta.get("step", -1))
  print("results on %s: %s" % (split, ", ".join(
      f"{key}={res[key]:.4f}" for key in ("edit_success", "reliability", "locality_acc_pre",
                                          "locality_acc_post", "locality_drawdown", "time_per_edit_s"))))
  return res


def evaluate_k_sweep(config, workdir: str, task: Task | None = None, split: str = "test",
                     ks=(1, 5, 25, 125), sequential: bool = True) -> dict:
  """Batched and sequential editing for each k (`evaluate.evaluate_ks`) with the saved editor.
  Writes workdir/results_k.json, workdir/results_k.md (the table) and workdir/k_sweep.png."""
  task = task or prepare(config)
  loaded = ckpt_lib.load_editor(workdir, task.model)
  data = getattr(task, split)
  n = int(config.eval.n_test) if int(config.eval.n_test) > 0 else None
  state = with_loc_pool(loaded.alg, loaded.state, task.train)
  res = eval_lib.evaluate_ks(loaded.alg, state, task.model.params, data, tuple(ks), n, sequential)
  table = eval_lib.ks_table(res)
  print(table)
  write_results(workdir, {"split": split, "checkpoint_step": int(loaded.meta.get("step", -1)),
                          **{mode: {str(k): r for k, r in rs.items()} for mode, rs in res.items()}},
                name="results_k.json")
  _write_text(os.path.join(workdir, "results_k.md"), table + "\n")
  eval_lib.plot_ks(res, os.path.join(workdir, "k_sweep.png"), title=f"{config.task}: {split} split")
  return res


def _write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(workdir: str, results: Mapping, name: str = "results.json") -> str:
  """Writes workdir/name atomically (a temporary file renamed), so a crash never leaves half."""
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dict(results), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def plot_metrics(workdir: str) -> str:
  """workdir/curves.png: training loss, edit success and locality agreement against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
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
  out = os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def show_edit(workdir: str, task: Task, record: Mapping, loaded=None) -> dict:
  """Applies one edit (record's src -> alt) and prints greedy answers before and after."""
  loaded = loaded or ckpt_lib.load_editor(workdir, task.model)
  loaded.state = with_loc_pool(loaded.alg, loaded.state, task.train)
  model, tok = task.model, task.tokenizer
  one = EditData.from_records([record], tok, task.train.edit.input_ids.shape[1], name="edit")
  new_params, info = loaded.edit(model.params, one.edit.take([0]))
  start = loaded.alg.pre_edit_params(loaded.state, model.params)
  prompts = [("edit prompt", record["src"]), ("paraphrase", record["rephrase"]), ("unrelated", record["loc"])]
  out = {"target": record["alt"], "rows": []}
  n_new = max(1, len(tok.encode(" " + record["alt"].strip(), add_special_tokens=False)))
  print(f"\nEdit: {record['src']!r} -> {record['alt']!r}   (loss before {float(info['loss_before']):.3f})")
  print(f"{'':12s} {'prompt':45s} {'before':>12s} {'after':>12s}")
  for name, p in prompts:
    before = eval_lib.greedy_answer(model, start, tok, p, max_new_tokens=n_new)
    after = eval_lib.greedy_answer(model, new_params, tok, p, max_new_tokens=n_new)
    out["rows"].append({"kind": name, "prompt": p, "before": before, "after": after})
    print(f"{name:12s} {p[:45]:45s} {before:>12s} {after:>12s}")
  return out
