"""Every paper task runs with every editor through the real entry point (`train_and_evaluate`),
in tiny mode (a tiny random model of the paper's family and a tokenizer trained offline) on small
files in the official formats: one training step, evaluation, results.json."""

import json
import math
import os

import ml_collections
import pytest

import paper_samples as S
from conftest import load_config
from mend_jax import editors, experiment

# (config, variant) for each paper task, and the other model families the paper's configs use
# (GPT-Neo, GPT-J, BART), which run with MEND. (The non-gated T5 of t5-large differs from
# t5-small's only in its MLP: tests/test_configs.py checks its tiny model.)
TASKS = [("zsre", "t5-small"), ("fever", "bert-base"), ("wikitext", "gpt2")]
FAMILIES = [("wikitext", "gpt-neo-2.7B"), ("wikitext", "gpt-j-6B"), ("zsre", "bart-base")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return S.write_all(tmp_path_factory.mktemp("paper_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One cache directory for the module's runs: the data files are read once per worker."""
  return tmp_path_factory.mktemp("cache")


def tiny(name, variant, files, cache_dir, alg="mend"):
  c = load_config(name, variant)
  c.tiny = True
  c.alg = alg
  c.cache_dir = str(cache_dir)
  c.mend.rank = 8
  c.ke.update(lstm_hidden=8, cond_dim=8, cond_hidden=8)
  c.ft.update(lr=1e-2, max_steps=3)
  c.ft_kl.update(lr=1e-2, max_steps=3, loc_batch_size=2)
  c.train.update(max_steps=1, accumulate=1, n_val=2, val_every=1, log_every=1, ckpt_every=1)
  c.eval.n_test = 2
  c.data.max_len = 32
  if c.task == "zsre":
    c.data.update(train_path=files["zsre_train"], test_path=files["zsre_dev"],
                  nq_path=files["nq"] if c.data.nq_path else "")
  elif c.task == "fever":
    c.data.update(train_path=files["fever_train"], test_path=files["fever_dev"])
  else:
    c.data.update(train_path=files["wiki_train"], test_path=files["wiki_dev"], loc_train_path=files["loc_text"],
                  loc_val_path=files["loc_jsonl"], min_words=5)
  return c


def _check_results(workdir, steps):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["steps"] == steps and res["n_skipped"] == 0 and res["n_test_edits"] == 2
  for key in ("edit_success", "reliability", "locality_acc_pre", "locality_acc_post", "locality_drawdown",
              "time_per_edit_s"):
    assert math.isfinite(res[key]), (key, res[key])
  return res


@pytest.mark.parametrize("alg", editors.NAMES)
@pytest.mark.parametrize("name,variant", TASKS)
def test_every_paper_task_runs_with_every_editor(name, variant, alg, files, cache, tmp_path_factory):
  c = tiny(name, variant, files, cache, alg)
  workdir = str(tmp_path_factory.mktemp(f"{name}_{alg}"))
  res = experiment.train_and_evaluate(c, workdir)
  _check_results(workdir, 1 if editors.REGISTRY[alg][0].learned else 0)
  assert res["alg"] == alg


@pytest.mark.parametrize("name,variant", FAMILIES)
def test_paper_model_families_run(name, variant, files, cache, tmp_path_factory):
  c = tiny(name, variant, files, cache)
  workdir = str(tmp_path_factory.mktemp(f"{name}_{variant}"))
  experiment.train_and_evaluate(c, workdir)
  res = _check_results(workdir, 1)
  assert math.isfinite(res["best_val_loss"])


def test_the_config_names_the_editor_and_its_section(synth_setup):
  m = synth_setup["model"]
  cfg = ml_collections.ConfigDict({"alg": "ke", "mend": {}, "ke": {"lstm_hidden": 8}})
  ed = experiment.make_editor(cfg, m)
  assert ed.name == "ke" and ed.cfg.lstm_hidden == 8
  with pytest.raises(ValueError, match="config.alg must be one of"):
    experiment.make_editor(ml_collections.ConfigDict({"alg": "rome"}), m)
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['enn.lrr'\]"):
    experiment.make_editor(ml_collections.ConfigDict({"alg": "enn", "enn": {"lrr": 1}}), m)
