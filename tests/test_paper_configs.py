"""Every paper config (configs/{wikitext,zsre,fever}_*.py), with the tiny override and small sample
files in the official formats, trains for one step and evaluates through the real entry point."""

import json
import math
import os

import pytest

import paper_samples as S
from conftest import load_config
from mend_jax import experiment, models, paper

# Same-family configs next to each other: their tiny models compile to the same programs, which the
# test session's persistent compilation cache (tests/conftest.py) then serves.
CONFIGS = ["wikitext_distilgpt2", "wikitext_gpt2", "wikitext_gpt2_medium", "wikitext_gpt2_large",
           "wikitext_gpt2_xl", "wikitext_gpt_neo_2_7b", "wikitext_gpt_j_6b", "zsre_t5_small", "zsre_t5_xl",
           "zsre_t5_xxl", "zsre_t5_large", "zsre_bart_base", "fever_bert_base"]
# Official config/model/*.yaml names.
OFFICIAL_NAMES = {
    "wikitext_distilgpt2": "MYX4567/distilgpt2-finetuned-wikitext2", "wikitext_gpt2": "gpt2",
    "wikitext_gpt2_medium": "gpt2-medium", "wikitext_gpt2_large": "gpt2-large", "wikitext_gpt2_xl": "gpt2-xl",
    "wikitext_gpt_neo_2_7b": "EleutherAI/gpt-neo-2.7B", "wikitext_gpt_j_6b": "EleutherAI/gpt-j-6B",
    "zsre_t5_small": "google/t5-small-ssm-nq", "zsre_t5_large": "google/t5-large-ssm-nq",
    "zsre_t5_xl": "google/t5-xl-ssm-nq", "zsre_t5_xxl": "google/t5-xxl-ssm-nq",
    "zsre_bart_base": "facebook/bart-base", "fever_bert_base": "bert-base-uncased",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return S.write_all(tmp_path_factory.mktemp("paper_data"))


def tiny(name, files, cache_dir):
  c = load_config(name)
  c.tiny = True
  c.cache_dir = str(cache_dir)
  c.editor.rank = 8
  c.train.update(max_steps=1, accumulate=1, n_val=2, val_every=1, log_every=1, ckpt_every=1)
  c.eval.n_test = 2
  c.data.max_len = 32
  if c.task == "zsre":
    c.data.update(train_path=files["zsre_train"], dev_path=files["zsre_dev"],
                  nq_path=files["nq"] if c.data.nq_path else "")
  elif c.task == "fever":
    c.data.update(train_path=files["fever_train"], dev_path=files["fever_dev"])
  else:
    c.data.update(train_path=files["wiki_train"], dev_path=files["wiki_dev"], loc_train_path=files["loc_text"],
                  loc_val_path=files["loc_jsonl"], min_words=5)
  return c


def test_configs_follow_the_official_settings():
  for name in CONFIGS:
    c = load_config(name)
    assert c.model.name_or_path == OFFICIAL_NAMES[name] and c.tiny is False
    assert (c.train.lr, c.train.lr_lr, c.editor.edit_lr, c.editor.rank) == (1e-6, 1e-4, 1e-4, 1920)
    assert (c.train.c_edit, c.train.c_loc, c.train.accumulate, c.train.grad_clip) == (0.1, 1.0, 10, 100.0)
    assert (c.train.n_edits, c.train.n_loc, c.train.val_every, c.train.n_val) == (1, 1, 5000, 500)
  assert load_config("wikitext_distilgpt2").model.tokenizer == "distilgpt2"
  assert load_config("zsre_bart_base").data.nq_path == "" and load_config("zsre_t5_small").data.nq_path


def test_tiny_models_are_of_the_paper_family(files):
  texts = [S.text(i) for i in range(10)]
  expect = {"t5-small": "wi_0", "t5-large": "wi"}  # the *-ssm-nq small/xl/xxl are gated, large is not
  for key, layer in expect.items():
    tok = paper.tiny_tokenizer("t5", texts)
    cfg = paper.tiny_hf_config("t5", tok, 32, paper.MODELS[key]["tiny"])
    m = models.model_from_config(cfg)
    assert all(p.split("/")[-2] in (layer, "wo") for p in m.layer_paths), m.layer_paths
  with pytest.raises(ValueError, match="model.tiny.no_such_field"):
    paper.tiny_hf_config("t5", tok, 32, {"no_such_field": 1})


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_trains_one_step_and_evaluates(name, files, tmp_path_factory):
  c = tiny(name, files, tmp_path_factory.mktemp("cache"))
  workdir = str(tmp_path_factory.mktemp(name))
  experiment.train_and_evaluate(c, workdir, progress=False)
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["steps"] == 1 and res["n_skipped"] == 0 and res["n_test_edits"] == 2
  for key in ("edit_success", "reliability", "locality_acc_pre", "locality_acc_post", "locality_drawdown",
              "best_val_loss", "time_per_edit_s"):
    assert math.isfinite(res[key]), (key, res[key])
