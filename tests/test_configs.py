"""The config schema: one for every experiment, locked against typos; the paper configs carry the
official names and hyperparameters; variants change only what they say."""

import json

import pytest

import paper_samples as S
from conftest import load_config
from mend_jax import configs, editors, models, paper
from mend_jax.configs import common

# Official config/model/*.yaml names, by (config, variant).
OFFICIAL_NAMES = {
    ("wikitext", "distilgpt2"): "MYX4567/distilgpt2-finetuned-wikitext2", ("wikitext", "gpt2"): "gpt2",
    ("wikitext", "gpt2-medium"): "gpt2-medium", ("wikitext", "gpt2-large"): "gpt2-large",
    ("wikitext", "gpt2-xl"): "gpt2-xl", ("wikitext", "gpt-neo-2.7B"): "EleutherAI/gpt-neo-2.7B",
    ("wikitext", "gpt-j-6B"): "EleutherAI/gpt-j-6B", ("zsre", "t5-small"): "google/t5-small-ssm-nq",
    ("zsre", "t5-large"): "google/t5-large-ssm-nq", ("zsre", "t5-xl"): "google/t5-xl-ssm-nq",
    ("zsre", "t5-xxl"): "google/t5-xxl-ssm-nq", ("zsre", "bart-base"): "facebook/bart-base",
    ("fever", "bert-base"): "bert-base-uncased",
}


def _keys(c, prefix=""):
  """Every key path of a config, except inside model.tiny (open by design)."""
  out = set()
  for k, v in c.items():
    path = f"{prefix}{k}"
    if hasattr(v, "items") and path != "model.tiny":
      out |= _keys(v, path + ".")
    else:
      out.add(path)
  return out


def test_every_config_has_the_same_schema_with_a_section_per_editor():
  all_configs = [load_config("synthetic", v) for v in ("demo", "long")] + [load_config(n, v) for n, v in OFFICIAL_NAMES]
  schema = _keys(all_configs[0])
  for c in all_configs:
    assert _keys(c) == schema, c.task
  assert {"seed", "task", "alg", "cache_dir", "tiny", "model.name_or_path", "data.train_path", "data.test_path",
          "train.lr", "eval.n_test"} <= schema
  for name in editors.NAMES:  # each editor's section holds all its config's fields
    fields = {f for f in editors.config_class(name).__dataclass_fields__}
    assert {k.split(".", 1)[1] for k in schema if k.startswith(name + ".")} == fields, name


def test_configs_are_locked_against_typos():
  c = load_config("synthetic")
  with pytest.raises((AttributeError, KeyError)):
    c.train.lrr = 1.0
  with pytest.raises((AttributeError, KeyError)):
    c.mend.ranq = 4
  c.train.lr = 1e-3  # existing fields still take values
  c.model.tiny.n_layer = 2  # model.tiny takes any field of a Hugging Face config
  with pytest.raises(ValueError, match="variant must be one of"):
    load_config("zsre", "t5-huge")
  with pytest.raises(ValueError, match="no packaged config 'zsrE'"):
    configs.path("zsrE")


def test_paper_configs_follow_the_official_settings():
  for (name, variant), hub_name in OFFICIAL_NAMES.items():
    c = load_config(name, variant)
    assert c.model.name_or_path == hub_name and c.tiny is False and c.alg == "mend"
    assert (c.train.lr, c.train.lr_lr, c.mend.edit_lr, c.mend.rank) == (1e-6, 1e-4, 1e-4, 1920)
    assert (c.train.c_edit, c.train.c_loc, c.train.accumulate, c.train.grad_clip) == (0.1, 1.0, 10, 100.0)
    assert (c.train.n_edits, c.train.n_loc, c.train.val_every, c.train.n_val) == (1, 1, 5000, 500)
  assert load_config("wikitext", "distilgpt2").model.tokenizer == "distilgpt2"
  assert load_config("zsre", "bart-base").data.nq_path == "" and load_config("zsre", "t5-small").data.nq_path
  assert load_config("zsre").model.name_or_path == "google/t5-small-ssm-nq"  # the default variant


def test_synthetic_long_changes_only_the_training_schedule():
  demo, long = load_config("synthetic", "demo").to_dict(), load_config("synthetic", "long").to_dict()
  changed = {k for k in demo["train"] if demo["train"][k] != long["train"][k]}
  assert changed == {"lr", "max_steps", "patience", "n_val"}
  assert (long["train"]["lr"], long["train"]["max_steps"], long["train"]["patience"], long["train"]["n_val"]) == (
      1e-4, 16000, 8, 256)
  assert {k: v for k, v in demo.items() if k != "train"} == {k: v for k, v in long.items() if k != "train"}


def test_tiny_models_are_of_the_paper_family():
  texts = [S.text(i) for i in range(10)]
  expect = {"t5-small": "wi_0", "t5-large": "wi"}  # the *-ssm-nq small/xl/xxl are gated, large is not
  for key, layer in expect.items():
    tok = paper.tiny_tokenizer("t5", texts)
    cfg = paper.tiny_hf_config("t5", tok, 32, paper.MODELS[key]["tiny"])
    m = models.model_from_config(cfg)
    assert all(p.split("/")[-2] in (layer, "wo") for p in m.layer_paths), m.layer_paths
  with pytest.raises(ValueError, match="model.tiny.no_such_field"):
    paper.tiny_hf_config("t5", tok, 32, {"no_such_field": 1})


def test_a_stored_config_from_an_older_schema_gets_the_new_fields_at_their_defaults():
  stored = json.loads(load_config("synthetic").to_json())
  stored["train"]["lr"] = 0.5
  del stored["mesh"], stored["data"]["cache_activations"]  # fields an older checkpoint lacks
  c = common.from_stored(stored)
  assert c.train.lr == 0.5 and c.mesh.data == 1 and c.data.cache_activations == ""
  with pytest.raises(AttributeError):
    c.train.nope = 1  # locked like every config
