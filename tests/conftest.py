"""Tiny configs of every supported family, batch builders and a small synthetic setup, shared by
the tests (which import them with `from conftest import ...`)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is tracing and compiling tiny models, not running them: compile with LLVM's
# cheap settings (HLO optimisation is unchanged), about a third less time per test, and with XLA's
# older elemental emitters instead of its MLIR fusion emitters, about a fifth less again.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false").strip()
# Many tests build new editor objects whose programs are identical to earlier ones: a persistent
# compilation cache for this session (a fresh directory) serves those instead of recompiling.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mend_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import functools
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jax

from mend_jax import configs, editors, models
from mend_jax.data.batches import read_positions
from mend_jax.data.batches import EditData
from mend_jax.editors import MEND, MENDConfig
from mend_jax.synthetic import benchmark
from mend_jax.synthetic.world import WorldConfig

V = 50  # vocabulary of the tiny models
# Llama/Mistral/Gemma/GPT-Neo/GPT-J build a max_position_embeddings^2 causal mask at setup: keep it small.
TINY_CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=4, n_head=2),
    "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=V, max_position_embeddings=32, hidden_size=16, num_layers=4,
                                       num_heads=2, attention_types=[[["global", "local"], 2]], window_size=8),
    "gptj": lambda: tf.GPTJConfig(vocab_size=V, n_positions=32, n_embd=16, n_layer=4, n_head=2, rotary_dim=4),
    "t5": lambda: tf.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                              decoder_start_token_id=0, pad_token_id=0),
    "t5_gated": lambda: tf.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                                    feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
    "bart": lambda: tf.BartConfig(vocab_size=V, d_model=16, encoder_layers=3, decoder_layers=3,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32),
    "bert": lambda: tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=1),
    "llama": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32),
    "mistral": lambda: tf.MistralConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        sliding_window=None),
    "gemma": lambda: tf.GemmaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=32, hidden_activation="gelu_pytorch_tanh"),
}
FAMILY_NAMES = tuple(TINY_CONFIGS)


def load_config(name: str, variant: str | None = None):
  """The packaged config `name` (mend_jax/configs/NAME.py) at `variant`, as the command line
  loads it (a fresh copy each call)."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", configs.path(name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


@functools.lru_cache(maxsize=None)
def tiny_model(name: str, seed: int = 0) -> models.EditableModel:
  """The tiny model of family `name` (one object per name and seed: it is frozen and its params
  immutable, and sharing it lets tests reuse the programs compiled for it)."""
  return models.model_from_config(TINY_CONFIGS[name](), seed=seed)


@functools.lru_cache(maxsize=None)
def jit_logits(model: models.EditableModel):
  """`model.logits` compiled once per input shape: tests that call a forward pass outside a jitted
  function would otherwise dispatch its hundreds of operations one by one."""
  return jax.jit(model.logits)


def make_batch(model: models.EditableModel, seed: int = 0, batch: int = 2, length: int = 8,
               n_labels: int = 3, pad: int = 0) -> dict:
  """A random edit batch: the last n_labels real tokens are scored; `pad` extra right-padding
  positions (attention 0, label -100) are appended to every sequence."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, V, size=(batch, length)).astype(np.int32)

  def padded(x, fill):
    return np.concatenate([x, np.full((x.shape[0], pad), fill, x.dtype)], 1) if pad else x

  mask = np.ones_like(ids)
  if model.task == "binary":
    return dict(input_ids=jnp.asarray(padded(ids, 0)), attention_mask=jnp.asarray(padded(mask, 0)),
                labels=jnp.asarray(rng.integers(0, 2, size=(batch,)).astype(np.int32)))
  if model.task == "seq2seq":
    dec = rng.integers(1, V, size=(batch, n_labels + 1)).astype(np.int32)
    labels = np.concatenate([dec[:, 1:], np.full((batch, 1), -100, np.int32)], 1)
    return dict(input_ids=jnp.asarray(padded(ids, 0)), attention_mask=jnp.asarray(padded(mask, 0)),
                decoder_input_ids=jnp.asarray(padded(dec, 0)),
                decoder_attention_mask=jnp.asarray(padded(np.ones_like(dec), 0)),
                labels=jnp.asarray(padded(labels, -100)))
  labels = np.where(np.arange(length)[None] >= length - n_labels, ids, -100).astype(np.int32)
  return dict(input_ids=jnp.asarray(padded(ids, 0)), attention_mask=jnp.asarray(padded(mask, 0)),
              labels=jnp.asarray(padded(labels, -100)))


@pytest.fixture(params=FAMILY_NAMES)
def family_model(request):
  return tiny_model(request.param)


@pytest.fixture(scope="session")
def synth_setup(tmp_path_factory):
  """A small synthetic world, its tokenizer, a tiny random GPT-2 for it, the train split as
  EditData and a rank-8 MEND editor."""
  root = tmp_path_factory.mktemp("synth")
  paths = benchmark.write_benchmark(root, WorldConfig(seed=1, n_subjects=30))
  tok = tf.AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  model = models.model_from_config(tf.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2,
                                                 n_head=2, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id))
  recs = benchmark.load_records(paths["train"])
  data = EditData.from_records(recs, tok, 24)
  return dict(root=root, paths=paths, tok=tok, model=model, data=data, editor=MEND(model, MENDConfig(rank=8)))


def with_read(model, batch, kl=None):
  """(batch, the same batch with read_pos/read_mask): kl is an optional kl_mask to add."""
  b = {k: np.asarray(v) for k, v in batch.items()}
  if kl is not None:
    b["kl_mask"] = kl
  pos, mask = read_positions(b["labels"], b.get("kl_mask"), seq2seq=model.task == "seq2seq")
  return {k: jnp.asarray(v) for k, v in b.items()}, {**{k: jnp.asarray(v) for k, v in b.items()},
                                                     "read_pos": jnp.asarray(pos), "read_mask": jnp.asarray(mask)}


# Small settings of every editor for the tiny models (FT: RMSprop, the official optimizer; the
# seeds of the FT tests are chosen for this lr).
EDITOR_CFGS = {"mend": {"rank": 4}, "ft": {"lr": 1e-2}, "ft_kl": {"lr": 1e-2, "loc_batch_size": 2}, "enn": {},
               "ke": {"lstm_hidden": 8, "cond_dim": 12, "cond_hidden": 10}}


@functools.lru_cache(maxsize=None)
def editor_setup(name: str, family: str = "gpt2"):
  """(editor, state) of editor `name` with EDITOR_CFGS for the tiny model of `family` (one model
  object per family and editor, so compiled programs are shared); FT+KL gets a pool of 6
  locality examples."""
  model = tiny_model(family)
  ed = editors.make(name, model, EDITOR_CFGS[name])
  state = ed.init(jax.random.PRNGKey(0), model.params)
  return ed, ed.with_loc_pool(state, make_batch(model, seed=100, batch=6))


def wrong_batch(model, seed=5):
  """An edit batch the model gets wrong (binary: labels flipped from its prediction)."""
  batch = make_batch(model, seed=seed)
  if model.task == "binary":
    pred = (jit_logits(model)(model.params, batch) > 0).astype(jnp.int32)
    batch = {**batch, "labels": 1 - pred}
  return batch
