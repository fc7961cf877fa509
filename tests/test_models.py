"""Model adapters: the paper's default layers, regex selection, loading from a directory, batch
checks and greedy decoding (against a brute-force loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_logits, make_batch, tiny_model
from mend_jax import models, tree


def test_default_editable_layers_follow_the_paper():
  paths = {n: tiny_model(n).layer_paths for n in ("gpt2", "t5", "t5_gated", "bart", "bert", "llama")}
  assert paths["gpt2"] == tuple(f"transformer/h/{i}/mlp/{m}/kernel" for i in (1, 2, 3) for m in ("c_fc", "c_proj"))
  assert paths["t5"] == tuple(
      [f"encoder/block/{i}/layer/1/DenseReluDense/{m}/kernel" for i in (1, 2) for m in ("wi", "wo")]
      + [f"decoder/block/{i}/layer/2/DenseReluDense/{m}/kernel" for i in (1, 2) for m in ("wi", "wo")])
  assert paths["t5_gated"][0].endswith("/DenseReluDense/wi_0/kernel") and len(paths["t5_gated"]) == 8
  assert paths["bart"] == tuple(
      [f"model/encoder/layers/{i}/{m}/kernel" for i in (1, 2) for m in ("fc1", "fc2")]
      + [f"model/decoder/layers/{i}/{m}/kernel" for i in (1, 2) for m in ("fc1", "fc2")])
  assert paths["bert"] == tuple(
      f"bert/encoder/layer/{i}/{m}/dense/kernel" for i in (1, 2, 3) for m in ("intermediate", "output"))
  assert paths["llama"] == tuple(
      f"model/layers/{i}/mlp/{m}/kernel" for i in (1, 2, 3) for m in ("down_proj", "gate_proj", "up_proj"))


def test_regex_override_and_errors():
  model = tiny_model("gpt2")
  one = model.with_layers([r"h/0/mlp/c_proj/kernel$"])
  assert one.layer_paths == ("transformer/h/0/mlp/c_proj/kernel",)
  with pytest.raises(ValueError, match="matched no parameter"):
    model.with_layers([r"nothing/like/this"])
  with pytest.raises(ValueError, match="not a valid regular expression"):
    model.with_layers([r"h/(0"])
  with pytest.raises(ValueError, match="only 2-D"):
    model.with_layers([r"c_fc/bias$"])


def test_unknown_family_is_a_clear_error():
  import transformers as tf

  with pytest.raises(ValueError, match="model_type 'roberta' is not supported"):
    models.model_from_config(tf.RobertaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=8))


def test_load_model_from_local_directory(tmp_path):
  """The real from_pretrained path, on a directory the test writes (no hub)."""
  model = tiny_model("gpt2")
  model.hf_model.save_pretrained(tmp_path / "m", params=model.params)
  loaded = models.load_model(str(tmp_path / "m"))
  assert loaded.layer_paths == model.layer_paths
  batch = make_batch(model)
  fwd = jax.jit(lambda m, p, b: m.logits(p, b), static_argnums=0)
  np.testing.assert_allclose(fwd(loaded, loaded.params, batch), fwd(model, model.params, batch), atol=1e-6)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_model(str(tmp_path / "missing"))



def test_bad_batches_get_clear_errors():
  model = tiny_model("gpt2")
  good = make_batch(model)
  with pytest.raises(ValueError, match="missing \\['labels'\\]"):
    models.check_batch(model, {k: v for k, v in good.items() if k != "labels"})
  with pytest.raises(ValueError, match="no scored token"):
    models.check_batch(model, {**good, "labels": jnp.full_like(good["labels"], -100)})
  with pytest.raises(ValueError, match="longer than the model's context of 32"):
    models.check_batch(model, make_batch(model, length=40))
  models.check_batch(model, good)



class _CharTok:
  """Characters 'a', 'b', ... are ids 1, 2, ...; 0 is eos/pad; no bos; decode writes ids."""

  bos_token_id = None
  eos_token_id = 0
  pad_token_id = 0

  def encode(self, text, add_special_tokens=False):
    return [ord(c) - ord("a") + 1 for c in text]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def test_greedy_answer_equals_an_unpadded_argmax_loop():
  model = tiny_model("gpt2")
  tok = _CharTok()
  prompt = "abcab"
  got = models.greedy_answer(model, model.params, tok, prompt, max_new_tokens=4, max_len=16)
  ids = tok.encode(prompt)
  want = []
  for _ in range(4):
    logits = jit_logits(model)(model.params, {"input_ids": jnp.asarray([ids]), "attention_mask": jnp.ones((1, len(ids)), jnp.int32)})
    nxt = int(jnp.argmax(logits[0, -1]))
    if nxt == 0:
      break
    ids.append(nxt)
    want.append(nxt)
  assert want and got == tok.decode(want)
  with pytest.raises(ValueError, match="exceeds the context of 8"):
    models.greedy_answer(model, model.params, tok, "abcdefg", max_new_tokens=3, max_len=8)


def test_check_batch_names_the_bad_key_and_what_was_expected():
  model = tiny_model("gpt2")
  good = {k: np.asarray(v) for k, v in make_batch(model, batch=2).items()}
  cases = [
      ({k: v for k, v in good.items() if k != "attention_mask"}, r"missing \['attention_mask'\]"),
      ({**good, "labels": good["labels"][:1]}, r"batch\['labels'\] has shape \(1, 8\); expected \(2, 8\)"),
      ({**good, "input_ids": good["input_ids"].astype(np.float32)}, r"batch\['input_ids'\] has dtype float32"),
      ({**good, "input_ids": good["input_ids"][0]}, r"must be \[batch, time\]"),
      ({**good, "input_ids": np.where(good["input_ids"] == good["input_ids"][1, 3], 50, good["input_ids"])},
       r"batch\['input_ids'\]\[1, 3\] = 50 is not a token id of this model \(vocabulary of 50\)"),
      ({**good, "labels": np.where(good["labels"] >= 0, 77, -100)}, r"batch\['labels'\]\[0, 5\] = 77"),
      ({**good, "labels": np.concatenate([good["labels"][:1], np.full((1, 8), -100)]).astype(np.int32)},
       r"row 1 has no scored token"),
      (make_batch(model, length=40), "longer than the model's context of 32"),
      ([1, 2, 3], "is a dict of arrays"),
  ]
  for bad, message in cases:
    with pytest.raises((ValueError, TypeError), match=message):
      models.check_batch(model, bad)
  models.check_batch(model, good)
  bert = tiny_model("bert")
  b = {k: np.asarray(v) for k, v in make_batch(bert).items()}
  with pytest.raises(ValueError, match=r"batch\['labels'\]\[0\] = 2; expected 0 or 1"):
    models.check_batch(bert, {**b, "labels": np.array([2, 0], np.int32)})
  # Under jit only the static checks run (values are not known).
  jax.jit(lambda x: models.check_batch(model, x) or 0)(good)
  with pytest.raises(ValueError, match="has shape"):
    jax.jit(lambda x: models.check_batch(model, x) or 0)({**good, "labels": good["labels"][:1]})


def test_check_finite_params_names_the_leaf():
  model = tiny_model("gpt2")
  models.check_finite_params(model.params)
  bad = tree.replace_leaves(model.params, {"transformer/h/1/attn/c_attn/kernel": jnp.full((48, 16), jnp.nan)})
  with pytest.raises(ValueError, match="'transformer/h/1/attn/c_attn/kernel' holds NaN or inf"):
    models.check_finite_params(bad)
