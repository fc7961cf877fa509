"""From a config to a trained, evaluated, saved editor: what the command line calls.

The config schema is `mend_jax.configs.common` (one for every experiment): seed, task, alg,
cache_dir, tiny, model, data, train, eval, mesh, and one section per editor named after it (mend, ft,
ft_kl, enn, ke).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import transformers
from absl import logging

from mend_jax import checkpoint as ckpt_lib
from mend_jax import editors, models, paper, report, sharding, tree
from mend_jax import evaluate as eval_lib
from mend_jax import train as train_lib
from mend_jax.data import formats, official, realfacts
from mend_jax.data.batches import EditData, encode_texts
from mend_jax.editors.base import Editor, build_config
from mend_jax.models import EditableModel, load_model
from mend_jax.synthetic import benchmark
from mend_jax.synthetic import pretrain as pretrain_lib
from mend_jax.synthetic import world as world_lib
from mend_jax.synthetic.world import WorldConfig

TASKS = ("synthetic", "facts", "zsre", "fever", "wikitext")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Task:
  """The data and base model of an experiment. text: an optional batch of plain passages whose
  perplexity evaluation measures before and after each edit."""

  model: EditableModel
  tokenizer: Any
  train: EditData
  val: EditData
  test: EditData
  text: dict | None = None


def _plain(cfg) -> dict:
  return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else json.loads(json.dumps(cfg))


def mesh_from_config(config):
  """The device mesh config.mesh asks for (`sharding.make_mesh`), or None for one device
  (data = fsdp = 1)."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  mesh = sharding.make_mesh(data, fsdp)  # checks the sizes
  return None if data * fsdp == 1 else mesh


def prepare(config, progress: Callable | None = None) -> Task:
  """Builds (and caches under config.cache_dir) the data and base model that `config` names,
  with the model's parameters placed on config.mesh's devices (`mend_jax.sharding`) if it asks
  for more than one.

  progress: passed to `pretrain.pretrain` when the synthetic base model has to be trained.
  """
  mesh = mesh_from_config(config)
  task = _prepare(config, progress)
  if mesh is None:
    return task
  params = sharding.shard_params(task.model, task.model.params, mesh)
  logging.info("base model placed on a mesh of %s", sharding.describe(mesh))
  return dataclasses.replace(task, model=dataclasses.replace(task.model, params=params))


def _prepare(config, progress: Callable | None = None) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")
  n_targets = int(config.data.targets_per_fact)
  if n_targets < 1:
    raise ValueError(f"config.data.targets_per_fact must be >= 1, got {n_targets}")
  if n_targets != 1 and (config.task not in ("synthetic", "facts") or _data_path(config, "train_path")):
    raise ValueError(f"config.data.targets_per_fact={n_targets} applies to the synthetic and real-facts benchmarks "
                     f"only (they know each fact's other possible targets); this config's task is {config.task!r}"
                     + (" with the user's edits in data.train_path" if config.task == "facts" else ""))
  if config.task == "facts":
    return _prepare_facts(config)
  if config.task != "synthetic":
    return _prepare_paper(config)
  cache = os.path.abspath(config.cache_dir)
  world_cfg = build_config(WorldConfig, config.data.world, "data.world")
  paths = benchmark.write_benchmark(os.path.join(cache, "data"), world_cfg)
  data_dir = os.path.dirname(str(paths["train"]))
  model_dir = config.model.name_or_path
  if not model_dir:
    pcfg = build_config(pretrain_lib.PretrainConfig, config.model.pretrain, "model.pretrain")
    model_dir = str(pretrain_lib.pretrain(data_dir, os.path.join(cache, "model"), pcfg, progress=progress))
  editable = tuple(config.model.editable) or None
  model = load_model(model_dir, editable=editable, dtype=config.model.dtype)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  max_len = int(config.data.max_len)
  if model.max_length is not None and max_len > model.max_length:
    raise ValueError(f"data.max_len={max_len} exceeds the model's context of {model.max_length}")
  records = {s: benchmark.load_records(paths[s]) for s in ("train", "val", "test")}
  if n_targets > 1:
    records["train"] = world_lib.with_more_targets(benchmark.load_world(data_dir), records["train"], n_targets,
                                                   int(config.seed))
  split = lambda s: EditData.from_records(records[s], tokenizer, max_len, name=str(paths[s]))
  return Task(model, tokenizer, split("train"), split("val"), split("test"))


def _prepare_facts(config) -> Task:
  """prepare() for edits of a causal LM: the user's files (data.train_path, val_path, test_path in
  any of `data.formats.FORMATS`) or, with no train_path, the real-facts benchmark
  (`data.realfacts`). Without val_path the last train.n_val training records validate."""
  seed, max_len = int(config.seed), int(config.data.max_len)
  cache = os.path.join(os.path.abspath(config.cache_dir), "models")
  name = str(config.model.name_or_path)
  model = load_model(name, editable=tuple(config.model.editable) or None, dtype=config.model.dtype, cache=cache)
  if model.task != "causal_lm":
    raise ValueError(f"config.task='facts' edits a causal LM; {name!r} is a {model.task} model ({model.family.name})")
  tokenizer = models.load_tokenizer(str(config.model.tokenizer or name), cache=cache)
  if model.max_length is not None and max_len > model.max_length:
    raise ValueError(f"data.max_len={max_len} exceeds the model's context of {model.max_length}")
  if _data_path(config, "train_path"):
    if not _data_path(config, "test_path"):
      raise ValueError("config.data.test_path is needed with data.train_path (the edits to evaluate)")
    train = formats.load_edits(config.data.train_path, seed)
    test = formats.load_edits(config.data.test_path, seed + 1)
    if _data_path(config, "val_path"):
      val = formats.load_edits(config.data.val_path, seed + 2)
    else:
      n_val = int(config.train.n_val)
      if not 0 < n_val < len(train):
        raise ValueError(f"train.n_val={n_val} validation edits are held out of {config.data.train_path!r}, which "
                         f"has {len(train)} rows; need 0 < n_val < {len(train)} (or give data.val_path)")
      train, val = train[:-n_val], train[-n_val:]
    names = {"train": config.data.train_path, "val": config.data.val_path or "held-out training rows",
             "test": config.data.test_path}
    text = None
  else:
    splits = realfacts.build(seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    n_targets = int(config.data.targets_per_fact)
    if n_targets > 1:
      train = realfacts.with_more_targets(train, n_targets, seed)
    names = {k: f"real-facts {k}" for k in ("train", "val", "test")}
    passages = realfacts.passages(realfacts.subjects(seed)["test"], limit=16)  # about 50 tokens each
    text = encode_texts(tokenizer, passages, 56, "real-facts passages").take(np.arange(len(passages)))
  build = lambda recs, split: EditData.from_records(recs, tokenizer, max_len, name=names[split])
  return Task(model, tokenizer, build(train, "train"), build(val, "val"), build(test, "test"), text)


def _data_path(config, key: str) -> str:
  path = str(config.data.get(key, "") or "")
  if path and not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.{key}={path!r} does not exist (see the config's docstring for "
                            "where the official data files go)")
  return path


def _load_paper_records(config):
  """(train, val, test) record lists of a paper task, and the NQ pairs (zsRE) or None.

  test = data.test_path, the official dev/valid file (what the paper reports); val = the last train.n_val rows of
  the train file, held out from training for early stopping, so model selection never sees test."""
  d, seed = config.data, int(config.seed)
  cache = os.path.join(os.path.abspath(config.cache_dir), "hf_datasets")
  train_path, test_path = _data_path(config, "train_path"), _data_path(config, "test_path")
  nq = None
  if config.task == "zsre":
    train, test = (official.load_zsre(p, seed, cache_dir=cache) for p in (train_path, test_path))
    if _data_path(config, "nq_path"):
      nq = official.load_nq(d.nq_path, cache_dir=cache)
      logging.info(nq.summary())
  elif config.task == "fever":
    train, test = (official.load_fever(p, seed, cache_dir=cache) for p in (train_path, test_path))
  else:
    min_words = int(d.get("min_words", 50))
    loc_train = official.load_texts(_data_path(config, "loc_train_path"), min_words, cache_dir=cache)
    loc_val = (official.load_texts(_data_path(config, "loc_val_path"), min_words, cache_dir=cache)
               if d.get("loc_val_path") else loc_train)
    for loaded in {id(x): x for x in (loc_train, loc_val)}.values():
      logging.info(loaded.summary())
    train = official.load_wiki_edits(train_path, loc_train.records, seed, cache_dir=cache)
    test = official.load_wiki_edits(test_path, loc_val.records, seed, cache_dir=cache)
  for loaded in (train, test):
    logging.info(loaded.summary())
  n_val = int(config.train.n_val)
  if not 0 < n_val < len(train):
    raise ValueError(f"train.n_val={n_val} validation edits are held out of {train.path!r}, which has "
                     f"{len(train)} usable records; need 0 < n_val < {len(train)}")
  records = train.records
  val = [dict(r) for r in records[-n_val:]]
  if config.task == "wikitext":  # validation edits take their locality from the validation texts
    order = np.random.default_rng([seed, 17]).permutation(len(loc_val.records))
    for i, r in enumerate(val):
      r["loc"] = loc_val.records[order[i % len(order)]]
  return records[:-n_val], val, test.records, (nq.records if nq is not None else None)


def _paper_model(config, texts):
  """(EditableModel, tokenizer): pretrained by name/path, or with config.tiny a tiny random model
  of the same family and a tokenizer trained on `texts`."""
  editable = tuple(config.model.editable) or None
  max_len = int(config.data.max_len)
  if config.get("tiny", False):
    family = str(config.model.family)
    tokenizer = paper.tiny_tokenizer(family, texts)
    hf_cfg = paper.tiny_hf_config(family, tokenizer, max_len, config.model.get("tiny", None))
    model = models.model_from_config(hf_cfg, editable=editable, seed=int(config.seed), dtype=config.model.dtype)
  else:
    model = load_model(config.model.name_or_path, editable=editable, dtype=config.model.dtype)
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
      logging.info("NQ: %d pairs with answers longer than data.max_len=%d left out", len(nq) - len(fits), max_len)
    official.pair_locality(val, fits, seed, "validation")
    official.pair_locality(test, fits, seed + 1, "test")
  dec = getattr(model.config, "decoder_start_token_id", None)
  build = lambda recs, name: EditData.from_records(recs, tokenizer, max_len, name=name, task=task,
                                                   decoder_start_id=dec, seed=seed)
  return Task(model, tokenizer, build(train, f"{config.task} train"), build(val, f"{config.task} validation"),
              build(test, f"{config.task} test"))


CACHE_MODES = ("", "memory", "disk")


def with_cached_activations(config, task: Task, editor: Editor, workdir: str, splits=("train", "val", "test")) -> Task:
  """The task with cached frozen activations in the given splits (`EditData.with_cached_activations`)
  when config.data.cache_activations asks for them ("memory", or "disk": memory-mapped files in
  workdir/activations, named by the model's identity and each split's tokens)."""
  mode = str(config.data.cache_activations)
  if mode not in CACHE_MODES:
    raise ValueError(f"config.data.cache_activations must be one of {CACHE_MODES}, got {mode!r}")
  if not mode:
    return task
  if not editor.frozen_prefix:
    logging.warning("%s changes the blocks below the edited layers: activations are not cached", editor.name)
    return task
  key = ckpt_lib.model_identity(task.model, task.model.params)["weights"]
  directory = os.path.join(workdir, "activations") if mode == "disk" else None
  t0 = time.time()
  out = {}
  for split in splits:
    data = getattr(task, split)
    if data.edit.hidden is not None:
      continue
    h = hashlib.sha256(key.encode())
    for view in (data.edit, data.equiv, data.loc):
      h.update(np.ascontiguousarray(view.input_ids).tobytes())
      h.update(np.ascontiguousarray(view.attention_mask).tobytes())
    out[split] = data.with_cached_activations(task.model, task.model.params, dtype=str(config.data.cache_dtype),
                                              directory=directory, name=f"{split}_{h.hexdigest()[:12]}")
  if out:
    logging.info("cached the input of %s for %s in %.1f s", task.model.cache_block, list(out), time.time() - t0)
  return dataclasses.replace(task, **out)


def make_editor(config, model: EditableModel) -> Editor:
  """The editor config.alg names, configured by its own section (config.mend, config.enn, ...);
  unknown names or keys raise a clear error."""
  name = str(config.alg)
  if name not in editors.NAMES:
    raise ValueError(f"config.alg must be one of {editors.NAMES}, got {name!r}")
  return editors.make(name, model, config[name])


def num_params(editor: Editor, base_params) -> int:
  """Trained parameters of an editor (ENN: the whole model plus its inner lrs; FT: 0)."""
  return tree.num_elements(jax.eval_shape(editor.init, jax.random.PRNGKey(0), base_params).params)


def loc_pool(data: EditData, max_rows: int = 1000) -> dict:
  """The locality examples of (up to max_rows of) a split as one batch dict: the pool that
  editors which sample locality data during an edit (FT+KL) draw from."""
  return data.loc.take(np.arange(min(len(data), max_rows)))


def train_and_evaluate(config, workdir: str, progress: Callable | None = None) -> dict:
  """Trains a learned editor (resuming from workdir if a checkpoint is there) or, for FT / FT+KL,
  saves their (untrained) state; evaluates the best one on the test split, writes
  workdir/results.json and workdir/curves.png, and returns the results.

  progress(step, total, row): called during pretraining and training (the command line's bar).
  """
  t0 = time.time()
  ckpt_lib.check_workdir(workdir)
  tcfg = build_config(train_lib.TrainConfig, config.train, "train")
  # A wrong train.init_from fails before the model loads, the rest of its checks once it has; a resumed run
  # starts from its own checkpoint and never reads it.
  warm = bool(tcfg.init_from) and not ckpt_lib.has_checkpoint(workdir)
  if warm:
    ckpt_lib.init_from_meta(tcfg.init_from)
  task = prepare(config, progress=progress)
  editor = make_editor(config, task.model)
  meta = {"config": _plain(config)}
  # A directory of another run (editor, model, layers) is refused before anything is written.
  ckpt_lib.check_workdir(workdir, {**meta, **ckpt_lib.fingerprint(editor, task.model.params)})
  if tcfg.init_from and not editor.learned:
    raise ValueError(f"train.init_from starts a learned editor from another run's; editor {editor.name!r} has "
                     "nothing to train")
  if warm:
    ckpt_lib.check_init_from(tcfg.init_from, editor, workdir, task.model.params)
  logging.info("base model: %s, editing %d layers %s; %s parameters: %s", task.model.family.name,
               len(task.model.layers), list(task.model.layer_paths), editor.name,
               f"{num_params(editor, task.model.params):,}")
  task = with_cached_activations(config, task, editor, workdir)
  if editor.learned:
    _, summary = train_lib.fit(editor, tcfg, task.model.params, task.train, task.val, workdir,
                               seed=int(config.seed), meta=meta, progress=progress,
                               mesh=mesh_from_config(config), shard_editor=bool(config.mesh.shard_editor))
  else:
    summary = ckpt_lib.save_untrained(editor, task.model.params, workdir, int(config.seed), meta)
  ckpt_lib.crash_point("before_eval")
  results = evaluate_workdir(config, workdir, task=task)
  results.update(summary)
  results["editor_params"] = num_params(editor, task.model.params)
  results["total_time_s"] = time.time() - t0
  report.write_json(os.path.join(workdir, "results.json"), results)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(metrics_path):
    try:
      report.plot_metrics(report.read_jsonl(metrics_path), os.path.join(workdir, "curves.png"))
    except Exception as e:  # a plot is a convenience; never lose the results over it
      logging.warning("could not plot the training curves: %s", e)
  return results


def _loaded(workdir: str, task: Task, config=None) -> ckpt_lib.LoadedEditor:
  """The saved editor, on the mesh of the task's model (if any; split as config.mesh says)."""
  split = bool(config.mesh.shard_editor) if config is not None else False
  loaded = ckpt_lib.load_editor(workdir, task.model, mesh=sharding.mesh_of(task.model.params), shard_editor=split)
  if config is not None:
    loaded = loaded.with_edit_steps(int(config.eval.edit_steps)).with_refine(int(config.eval.refine))
  return loaded.with_loc_pool(loc_pool(task.train)) if loaded.editor.needs_loc_pool else loaded


def check_protect(split: str, protect: str | None, preserve: float | None, config=None) -> None:
  """Raises ValueError unless `protect` (None, or a split other than the evaluated `split`) and
  `preserve` (None, or given with protect) are arguments `evaluate_workdir` accepts, and, with
  the experiment `config` of the editor, the editor can protect facts (`protecting_gamma`)."""
  if protect is not None and protect not in SPLITS:
    raise ValueError(f"protect must be one of {SPLITS} (the split whose facts to keep), got {protect!r}")
  if protect is not None and protect == split:
    raise ValueError(f"protect={protect!r} is the evaluated split: its locality examples would be both the facts "
                     "the term keeps and the ones locality is measured on; protect another split")
  if preserve is not None and protect is None:
    raise ValueError("preserve (the gamma of the protecting term) needs protect (the split whose facts to keep)")
  if protect is not None and config is not None:
    ckpt_lib.protecting_gamma(str(config.alg), config.get(str(config.alg), {}), preserve)


def evaluate_workdir(config, workdir: str, task: Task | None = None, split: str = "test",
                     k: int | None = None, protect: str | None = None, preserve: float | None = None) -> dict:
  """Batched evaluation (`evaluate.evaluate`) of the editor saved in workdir on a split.

  protect: another split whose facts the edits keep (`LoadedEditor.protecting`: a least-squares
  editor's preservation term re-measured on its locality examples, with gamma `preserve`, None: as
  trained); the results add locality_protected, measured on that split's locality examples."""
  check_protect(split, protect, preserve, config)
  task = task or prepare(config)
  loaded = _loaded(workdir, task, config)
  protected = None
  if protect is not None:
    protected = getattr(task, protect)
    loaded = loaded.protecting(task.model.params, protected, preserve)
  task = with_cached_activations(config, task, loaded.editor, workdir, (split,))
  data = getattr(task, split)
  n = int(config.eval.n_test) if int(config.eval.n_test) > 0 else None
  res = eval_lib.evaluate(loaded.editor, loaded.state, task.model.params, data, n_edits=n,
                          k=int(config.eval.k if k is None else k), text=task.text, protected=protected)
  if protect is not None:
    res.update(protect=protect, preserve=loaded.editor.cfg.preserve)
  res["alg"] = loaded.editor.name
  res["split"] = split
  if hasattr(loaded.editor.cfg, "edit_steps"):
    res["edit_steps"] = loaded.editor.cfg.edit_steps
    res["refine"] = loaded.editor.cfg.refine
  res["checkpoint_step"] = int(loaded.meta.get("step", -1))
  return res


def steps_suffix(config) -> str:
  """"_stepsN" when config.eval.edit_steps overrides the trained editor's steps, "_refineM" when
  config.eval.refine adds refinement steps, else "": the results of an override go to their own
  files."""
  n, m = int(config.eval.edit_steps), int(config.eval.refine)
  return (f"_steps{n}" if n else "") + (f"_refine{m}" if m else "")


def evaluate_k_sweep(config, workdir: str, task: Task | None = None, split: str = "test",
                     ks=(1, 5, 25, 125), sequential: bool = True) -> dict:
  """Batched and sequential editing for each k (`evaluate.evaluate_ks`) with the saved editor.
  Writes workdir/results_k.json, workdir/results_k.md (the table) and workdir/k_sweep.png (with
  config.eval.edit_steps set: results_k_stepsN.json and so on)."""
  task = task or prepare(config)
  loaded = _loaded(workdir, task, config)
  task = with_cached_activations(config, task, loaded.editor, workdir, (split,))
  data = getattr(task, split)
  n = int(config.eval.n_test) if int(config.eval.n_test) > 0 else None
  res = eval_lib.evaluate_ks(loaded.editor, loaded.state, task.model.params, data, tuple(ks), n, sequential,
                             text=task.text)
  sfx = steps_suffix(config)
  report.write_json(os.path.join(workdir, f"results_k{sfx}.json"),
                    {"split": split, "checkpoint_step": int(loaded.meta.get("step", -1)),
                     **{mode: {str(k): r for k, r in rs.items()} for mode, rs in res.items()}})
  report.atomic_write_text(os.path.join(workdir, f"results_k{sfx}.md"), report.ks_table(res) + "\n")
  report.plot_ks(res, os.path.join(workdir, f"k_sweep{sfx}.png"), title=f"{config.task}: {split} split")
  return res


def evaluate_stream_workdir(config, workdir: str, task: Task | None = None, split: str = "test", k: int = 1,
                            every: int = 10) -> dict:
  """Lifelong editing (`evaluate.evaluate_stream`) with the saved editor on a split's first
  config.eval.n_test edits (all: -1). Writes workdir/results_stream.json and workdir/stream.png
  (with config.eval.edit_steps set: results_stream_stepsN.json, stream_stepsN.png)."""
  task = task or prepare(config)
  loaded = _loaded(workdir, task, config)
  task = with_cached_activations(config, task, loaded.editor, workdir, (split,))
  n = int(config.eval.n_test) if int(config.eval.n_test) > 0 else None
  res = eval_lib.evaluate_stream(loaded.editor, loaded.state, task.model.params, getattr(task, split), k=k,
                                 n_edits=n, every=every)
  res.update(split=split, checkpoint_step=int(loaded.meta.get("step", -1)))
  sfx = steps_suffix(config)
  report.write_json(os.path.join(workdir, f"results_stream{sfx}.json"), res)
  report.plot_stream({f"k={k}": res}, os.path.join(workdir, f"stream{sfx}.png"), title=f"{config.task}: {split} split")
  return res


def show_edit(workdir: str, task: Task, record: Mapping, loaded: ckpt_lib.LoadedEditor | None = None) -> dict:
  """Applies one edit (record's src -> alt) with the saved editor and returns greedy answers
  before and after on the edit prompt, its paraphrase and an unrelated prompt:
  {"target", "loss_before", "rows": [{kind, prompt, before, after}]}."""
  loaded = loaded or _loaded(workdir, task)
  model, tok = task.model, task.tokenizer
  one = EditData.from_records([record], tok, task.train.edit.input_ids.shape[1], name="edit")
  new_params, info = loaded.edit(model.params, one.edit.take([0]))
  start = loaded.editor.pre_edit_params(loaded.state, model.params)
  prompts = [("edit prompt", record["src"]), ("paraphrase", record["rephrase"]), ("unrelated", record["loc"])]
  n_new = max(1, len(tok.encode(" " + record["alt"].strip(), add_special_tokens=False)))
  rows = [{"kind": name, "prompt": p,
           "before": models.greedy_answer(model, start, tok, p, max_new_tokens=n_new),
           "after": models.greedy_answer(model, new_params, tok, p, max_new_tokens=n_new)}
          for name, p in prompts]
  return {"prompt": record["src"], "target": record["alt"], "loss_before": float(info["loss_before"]), "rows": rows}
