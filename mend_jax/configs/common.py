"""The one config schema of every experiment.

  seed, task ("synthetic", "facts", "zsre", "fever", "wikitext"), alg (the editor: mend, ft, ft_kl, enn,
  ke), cache_dir, tiny (a tiny random model of the same family instead of the pretrained one);
  model: name_or_path, tokenizer, family, editable (regexes; empty: the paper's layers), dtype
    (float32 or bfloat16: the base model's parameters and computation; editors stay float32), tiny
    (overrides of the tiny Hugging Face config), pretrain (PretrainConfig: the synthetic base model);
  data: max_len, train_path, val_path, test_path (and the task's extra files: nq_path,
    loc_train_path, loc_val_path, min_words), world (WorldConfig: the synthetic world),
    targets_per_fact (the synthetic world and the real-facts benchmark: training records per fact,
    each with its own new target; a training batch holds at most one of them),
    cache_activations ("": off; "memory" or "disk": the hidden state entering the lowest edited
    block, computed once per record, so training and evaluation run only the edited blocks and
    the head; "disk" keeps memory-mapped files in the work directory), cache_dtype;
  train: TrainConfig;  eval: n_test (-1: all), k, show_edit, edit_steps (MEND: apply the editor this
    many times per edit in evaluation, `MENDConfig.edit_steps`; 0: as it was trained), refine (MEND:
    this many FT+KL steps after each edit in evaluation, `MENDConfig.refine`; 0: as it was trained);
  mesh: data, fsdp (a device mesh of data x fsdp devices, `mend_jax.sharding`; 1 x 1: one device),
    shard_editor (split the editor's state over fsdp instead of replicating it);
  mend, ft, ft_kl, enn, ke: each editor's config (MENDConfig, FTConfig, ...), used when alg names it.

Every section holds all its fields, and configs are locked: a misspelt key, in a config file or a
--config.x.y override, is an error. (model.tiny stays open: it takes any field of the family's
Hugging Face config.)
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mend_jax import editors, paper
from mend_jax.synthetic.pretrain import PretrainConfig
from mend_jax.synthetic.world import WorldConfig
from mend_jax.train import TrainConfig

TASKS = ("synthetic", "facts", "zsre", "fever", "wikitext")


def _section(obj) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(obj))


def base_config(task: str) -> ml_collections.ConfigDict:
  """Every field of the schema at its default, unlocked (a config file sets values, then `lock`)."""
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = task
  c.alg = "mend"
  c.cache_dir = f"cache/{task}"
  c.tiny = False
  world = dataclasses.asdict(WorldConfig())
  del world["relations"]  # the default relations; not a command-line value
  c.model = ml_collections.ConfigDict({
      "name_or_path": "", "tokenizer": "", "family": "", "editable": (), "dtype": "float32",
      "tiny": ml_collections.ConfigDict(), "pretrain": _section(PretrainConfig())})
  c.data = ml_collections.ConfigDict({
      "max_len": 32, "train_path": "", "val_path": "", "test_path": "", "nq_path": "", "loc_train_path": "",
      "loc_val_path": "", "min_words": 0, "world": ml_collections.ConfigDict(world), "targets_per_fact": 1, "cache_activations": "",
      "cache_dtype": "float32"})
  c.train = _section(TrainConfig())
  c.eval = ml_collections.ConfigDict({"n_test": -1, "k": 1, "show_edit": False, "edit_steps": 0,
                                     "refine": 0})
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "shard_editor": False})
  for name in editors.NAMES:
    c[name] = _section(editors.config_class(name)())
  return c


def from_stored(stored) -> ml_collections.ConfigDict:
  """The config a checkpoint stored (a dict, `experiment` meta["config"]) on today's schema:
  fields added to the schema since it was saved take their defaults (they reproduce the
  behaviour it was run with); locked."""
  stored = dict(stored)
  c = base_config(str(stored.get("task", "synthetic")))

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v)
      else:
        dst[k] = v

  merge(c, stored)
  return lock(c)


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config against new keys (model.tiny stays open). Returns c."""
  c.lock()
  c.model.tiny.unlock()
  return c


def paper_config(task: str, model: str) -> ml_collections.ConfigDict:
  """The paper's experiment `task` ("zsre", "fever", "wikitext") with `model` (a key of
  paper.MODELS), locked. Hyperparameters of the official config/config.yaml and
  config/alg/mend.yaml: Adam lr 1e-6 on the editor, initial edit step 1e-4 with its own lr 1e-4,
  rank 1920, c_edit 0.1, c_loc 1, gradient clipping 100, one edit and one locality example per
  micro-batch, 10 micro-batches per update, validation every 5000 micro-steps on 500 edits, early
  stopping after 4 validations without improvement."""
  if task not in paper.DATA_TASK:
    raise ValueError(f"task must be one of {sorted(paper.DATA_TASK)}, got {task!r}")
  if model not in paper.MODELS:
    raise ValueError(f"model must be one of {sorted(paper.MODELS)} for task {task!r}, got {model!r}")
  m = paper.MODELS[model]
  c = base_config(task)
  c.cache_dir = "cache/paper"
  c.model.update(name_or_path=m["name"], tokenizer=m.get("tokenizer", ""), family=m["family"])
  c.model.tiny.update(dict(m.get("tiny", {})))
  c.data.update(paper.DATA[task])
  if model == "distilgpt2":  # official README: data.wiki_webtext=False for this model
    c.data.update(loc_train_path="data/wikitext/wiki.train.raw", loc_val_path="data/wikitext/wiki.valid.raw",
                  min_words=50)
  if model == "bart-base":  # official README: data.zsre_nq=False for BART
    c.data.nq_path = ""
  c.mend.update(rank=1920, edit_lr=1e-4)
  c.train.update(lr=1e-6, lr_lr=1e-4, c_edit=0.1, c_loc=1.0, accumulate=10, grad_clip=100.0, max_steps=1_000_000,
                 n_edits=1, n_loc=1, val_every=5000, n_val=500, patience=4, log_every=100, ckpt_every=5000,
                 kl_positions="answer")
  return lock(c)
