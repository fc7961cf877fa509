"""Every paper task runs through the real entry point (`train_and_evaluate`) with MEND, and every
editor runs on a paper task, in tiny mode (a tiny random model of the paper's family and a
tokenizer trained offline) on small files in the official formats: one training step, evaluation,
results.json. (Every editor's edit of each family's model is checked in tests/editors/.)"""

import json
import math
import os

import chex
import ml_collections
import numpy as np
import pytest

import paper_samples as S
from conftest import load_config
from mend_jax import editors, experiment

# (config, variant) for each paper task, and BART, the paper's other seq2seq family, which runs
# with MEND. (GPT-Neo's and GPT-J's adapters are checked in tests/test_capture.py; the non-gated T5
# of t5-large differs from t5-small's only in its MLP: tests/test_configs.py checks its tiny model.)
TASKS = [("zsre", "t5-small"), ("fever", "bert-base"), ("wikitext", "gpt2")]
# MEND on every task; the learned baselines on the seq2seq and the classification task (their
# training losses differ most from the causal LM's); fine-tuning on one task each.
RUNS = [(*task, "mend") for task in TASKS] + [
    ("zsre", "t5-small", "enn"), ("zsre", "t5-small", "ke"), ("fever", "bert-base", "enn"), ("fever", "bert-base", "ke"),
    ("fever", "bert-base", "ft_kl"), ("wikitext", "gpt2", "ft")]
assert {alg for *_, alg in RUNS} == set(editors.NAMES)
FAMILIES = [("zsre", "bart-base")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return S.write_all(tmp_path_factory.mktemp("paper_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One cache directory for the module's runs: the data files are read once per worker."""
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def prepare_once():
  """The runs of one task and variant share its prepared data and tiny model (tokenizer training,
  data loading and model init happen once per worker); each run still trains and evaluates its own
  editor through train_and_evaluate."""
  real, done = experiment.prepare, {}

  def cached(config, progress=None):
    key = (config.task, config.model.name_or_path, config.cache_dir, config.data.train_path)
    if key not in done:
      done[key] = real(config, progress)
    return done[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(experiment, "prepare", cached)
    yield


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


@pytest.mark.parametrize("name,variant,alg", RUNS)
def test_paper_tasks_run_with_the_editors(name, variant, alg, files, cache, tmp_path_factory):
  c = tiny(name, variant, files, cache, alg)
  workdir = str(tmp_path_factory.mktemp(f"{name}_{alg}"))
  res = experiment.train_and_evaluate(c, workdir)
  _check_results(workdir, 1 if editors.REGISTRY[alg][0].learned else 0)
  assert res["alg"] == alg


def test_init_from_with_an_editor_that_trains_nothing_is_refused_before_anything_is_written(files, cache, tmp_path):
  from mend_jax import checkpoint as ckpt_lib
  from conftest import tiny_model
  ckpt_lib.save_untrained(editors.make("ft", tiny_model("gpt2"), {}), tiny_model("gpt2").params,
                          str(tmp_path / "src"), 0, {})
  c = tiny("wikitext", "gpt2", files, cache, "ft")
  c.train.init_from = str(tmp_path / "src")
  with pytest.raises(ValueError, match="train.init_from starts a learned editor.*'ft' has nothing to train"):
    experiment.train_and_evaluate(c, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_missing_init_from_fails_before_the_model_loads(tmp_path, monkeypatch):
  monkeypatch.setattr(experiment, "prepare", lambda *a, **k: pytest.fail("the model and data were loaded"))
  c = load_config("synthetic")
  c.train.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="train.init_from: no checkpoint at '.*missing'"):
    experiment.train_and_evaluate(c, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


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


def test_protecting_arguments_are_checked_before_anything_loads():
  experiment.check_protect("test", "val", 30.0)
  experiment.check_protect("val", "train", None)
  experiment.check_protect("test", None, None)
  for args, message in ((("test", "test", None), "is the evaluated split"),
                        (("test", "holdout", None), "protect must be one of"),
                        (("test", None, 3.0), "needs protect")):
    with pytest.raises(ValueError, match=message):
      experiment.check_protect(*args)
  # With the editor's stored config: checked before the model and data load, too.
  config = lambda alg, **mend: ml_collections.ConfigDict({"alg": alg, "mend": {"aggregation": "sum", "preserve": 0.0,
                                                                                **mend}, "ft": {}})
  experiment.check_protect("test", "val", None, config("mend", aggregation="least_squares", preserve=3.0))
  experiment.check_protect("test", "val", 0.5, config("mend", aggregation="least_squares"))
  for cfg, preserve, message in ((config("mend"), 3.0, "aggregation='least_squares'; this one is 'mend' with "
                                                         "aggregation='sum'"),
                                 (config("ft"), 3.0, "this one is 'ft'"),
                                 (config("mend", aggregation="least_squares"), None, "trained without the term"),
                                 (config("mend", aggregation="least_squares", preserve=3.0), -1.0, "must be a number > 0")):
    with pytest.raises(ValueError, match=message):
      experiment.check_protect("test", "val", preserve, cfg)


def test_targets_per_fact_is_an_error_where_the_other_targets_are_unknown(tmp_path):
  from mend_jax.configs import facts as facts_config
  from mend_jax.configs import zsre as zsre_config

  c = facts_config.get_config()
  users = tmp_path / "edits.json"
  users.write_text("[]")
  with c.unlocked():
    c.data.targets_per_fact = 4
    c.data.train_path = str(users)
  with pytest.raises(ValueError, match=r"targets_per_fact=4 applies to the synthetic and real-facts benchmarks only"
                                       r".*'facts' with the user's edits in data.train_path"):
    experiment.prepare(c)
  z = zsre_config.get_config()
  with z.unlocked():
    z.data.targets_per_fact = 2
  with pytest.raises(ValueError, match=r"targets_per_fact=2 applies to the synthetic and real-facts.*'zsre'$"):
    experiment.prepare(z)
  with c.unlocked():
    c.data.targets_per_fact = 0
  with pytest.raises(ValueError, match=r"targets_per_fact must be >= 1, got 0"):
    experiment.prepare(c)


def test_facts_task_trains_on_the_users_files_and_edits_from_strings(tmp_path):
  """A causal LM (a tiny llama saved as a model directory with its tokenizer), edits in EasyEdit's
  format for training and CounterFact's for test, through the real entry point; the saved editor
  then edits from strings."""
  import transformers as tf

  from mend_jax import checkpoint, models, paper
  from mend_jax.data import batches

  easy = [{"prompt": f"The capital of {c} is", "target_new": t, "ground_truth": g,
           "rephrase_prompt": f"{c}'s capital is", "locality_prompt": "The sky is", "locality_ground_truth": "blue"}
          for c, t, g in [("France", "Lyon", "Paris"), ("Italy", "Milan", "Rome"), ("Spain", "Seville", "Madrid"),
                          ("Japan", "Osaka", "Tokyo"), ("Peru", "Cusco", "Lima"), ("Chile", "Arica", "Santiago")]]
  cf = [{"requested_rewrite": {"prompt": "The capital of {} is", "subject": c, "target_new": {"str": t},
                               "target_true": {"str": g}},
         "paraphrase_prompts": [f"{c}'s capital is"], "neighborhood_prompts": ["The capital of Chile is"]}
        for c, t, g in [("Kenya", "Mombasa", "Nairobi"), ("Egypt", "Giza", "Cairo")]]
  texts = [f"{r['prompt']} {r['target_new']} {r['ground_truth']} {r['rephrase_prompt']}" for r in easy] + [
      "The sky is blue", "Kenya Mombasa Nairobi Egypt Giza Cairo Chile Santiago"]
  tok = paper.tiny_tokenizer("gpt2", texts)
  cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  model_dir = tmp_path / "model"
  m = models.model_from_config(cfg)
  m.hf_model.save_pretrained(model_dir, params=m.params)
  tok.save_pretrained(model_dir)
  (tmp_path / "train.json").write_text(json.dumps(easy))
  (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in cf))
  c = load_config("facts")
  c.model.name_or_path = str(model_dir)
  c.data.update(train_path=str(tmp_path / "train.json"), test_path=str(tmp_path / "test.jsonl"))
  c.mend.rank = 8
  c.train.update(max_steps=2, accumulate=1, n_val=2, val_every=2, log_every=1, ckpt_every=2)
  c.eval.update(n_test=2, show_edit=False)
  c.cache_dir = str(tmp_path / "cache")
  workdir = str(tmp_path / "run")
  res = experiment.train_and_evaluate(c, workdir)
  assert res["n_test_edits"] == 2 and math.isfinite(res["edit_success"]) and 0 <= res["locality_unchanged"] <= 1
  loaded = checkpoint.load_editor(workdir, models.load_model(str(model_dir)))
  assert loaded.tokenizer is not None  # found beside the model
  new, info = loaded.edit_texts(m.params, ["The capital of Kenya is", "The capital of Peru is"], ["Mombasa", "Cusco"])
  ref = batches.encode_pairs(loaded.tokenizer, ["The capital of Kenya is", "The capital of Peru is"],
                             ["Mombasa", "Cusco"], 16)
  want, _ = loaded.edit(m.params, ref.take(np.arange(2)))
  chex.assert_trees_all_equal(new, want)
  assert isinstance(loaded.generate(new, "The capital of Kenya is", 2), str)
  with pytest.raises(TypeError, match="lists of strings"):
    loaded.edit_texts(m.params, "The capital of Kenya is", "Mombasa")
