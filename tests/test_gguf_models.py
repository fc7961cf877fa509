"""GGUF conversion on small files the tests write with the gguf package's own writer: the Flax
parameters come back exactly (q/k rows un-permuted, kernels transposed, a tied head written
out), the tokenizer is the file's BPE, and bad files are one clear error with nothing left in
the cache."""

import os

import chex
import gguf
import numpy as np
import pytest

from mend_jax import gguf_models, models, tree

HIDDEN, N_HEAD, N_KV, FFN, LAYERS = 16, 4, 2, 32, 2
TOKENS = ["<unk>", "<s>", "</s>"] + list("abcdefgh") + ["Ġ", "ab", "Ġa", "1", "2"]
MERGES = ["a b", "Ġ a"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter's row permutation of q/k ([out, in]): the forward direction, written
  here independently of the reader's inverse."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference(seed=0):
  """A random tiny llama in the Flax layout ([in, out] kernels), float32."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(size=s).astype(np.float32)
  v, hd = len(TOKENS), HIDDEN // N_HEAD
  flat = {"model/embed_tokens/embedding": r(v, HIDDEN), "model/norm/weight": r(HIDDEN)}
  for i in range(LAYERS):
    p = f"model/layers/{i}/"
    flat.update({p + "self_attn/q_proj/kernel": r(HIDDEN, N_HEAD * hd), p + "self_attn/k_proj/kernel": r(HIDDEN, N_KV * hd),
                 p + "self_attn/v_proj/kernel": r(HIDDEN, N_KV * hd), p + "self_attn/o_proj/kernel": r(HIDDEN, HIDDEN),
                 p + "mlp/gate_proj/kernel": r(HIDDEN, FFN), p + "mlp/up_proj/kernel": r(HIDDEN, FFN),
                 p + "mlp/down_proj/kernel": r(FFN, HIDDEN), p + "input_layernorm/weight": r(HIDDEN),
                 p + "post_attention_layernorm/weight": r(HIDDEN)})
  flat["lm_head/kernel"] = flat["model/embed_tokens/embedding"].T.copy()  # tied
  return flat


def _write(path, flat, arch="llama", q8_1_tensor=None, tied=True):
  """A GGUF file of the reference weights, as llama.cpp lays them out."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(LAYERS)
  w.add_context_length(64)
  w.add_embedding_length(HIDDEN)
  w.add_feed_forward_length(FFN)
  w.add_head_count(N_HEAD)
  w.add_head_count_kv(N_KV)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(TOKENS)
  w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_add_bos_token(False)
  t = lambda name: flat[name].T  # GGUF rows are output features
  w.add_tensor("token_embd.weight", flat["model/embed_tokens/embedding"])
  w.add_tensor("output_norm.weight", flat["model/norm/weight"])
  if not tied:
    w.add_tensor("output.weight", t("lm_head/kernel"))
  for i in range(LAYERS):
    p, b = f"model/layers/{i}/", f"blk.{i}."
    w.add_tensor(b + "attn_q.weight", _llama_cpp_permute(t(p + "self_attn/q_proj/kernel"), N_HEAD))
    w.add_tensor(b + "attn_k.weight", _llama_cpp_permute(t(p + "self_attn/k_proj/kernel"), N_KV))
    w.add_tensor(b + "attn_v.weight", t(p + "self_attn/v_proj/kernel"))
    w.add_tensor(b + "attn_output.weight", t(p + "self_attn/o_proj/kernel"))
    w.add_tensor(b + "ffn_gate.weight", t(p + "mlp/gate_proj/kernel"))
    w.add_tensor(b + "ffn_up.weight", t(p + "mlp/up_proj/kernel"))
    if q8_1_tensor and i == 0:  # raw Q8_1 blocks (40 bytes per 32 values), which gguf cannot dequantize
      w.add_tensor(b + "ffn_down.weight", np.zeros((HIDDEN, FFN // 32 * 40), np.uint8),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    else:
      w.add_tensor(b + "ffn_down.weight", t(p + "mlp/down_proj/kernel"))
    w.add_tensor(b + "attn_norm.weight", flat[p + "input_layernorm/weight"])
    w.add_tensor(b + "ffn_norm.weight", flat[p + "post_attention_layernorm/weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_gives_back_the_weights_exactly(tmp_path, tied):
  flat = _reference()
  if not tied:
    flat["lm_head/kernel"] = np.random.default_rng(1).normal(size=(HIDDEN, len(TOKENS))).astype(np.float32)
  path = _write(tmp_path / "tiny.gguf", flat, tied=tied)
  directory = gguf_models.resolve(path, cache=str(tmp_path / "cache"))
  model = models.load_model(directory)
  assert model.family.name == "llama" and model.config.num_key_value_heads == N_KV
  assert model.config.max_position_embeddings == 64
  chex.assert_trees_all_equal(tree.flatten(model.params), flat)
  assert gguf_models.load_info(directory)["architecture"] == "llama"
  # The second call finds the converted directory.
  assert gguf_models.resolve(path, cache=str(tmp_path / "cache")) == directory


def test_the_tokenizer_is_the_files_bpe_with_its_settings(tmp_path):
  path = _write(tmp_path / "tiny.gguf", _reference())
  tok = models.load_tokenizer(gguf_models.resolve(path, cache=str(tmp_path / "cache")))
  ids = tok("ab a12", add_special_tokens=False)["input_ids"]
  assert [TOKENS[i] for i in ids] == ["ab", "Ġa", "1", "2"]  # merges applied; digits one by one
  assert tok.decode(ids) == "ab a12"
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
  assert models.bos_ids(tok) == []  # the file's add_bos_token = false


def test_bad_files_are_clear_errors_and_leave_no_directory(tmp_path):
  cache = tmp_path / "cache"
  bad_arch = _write(tmp_path / "gpt.gguf", _reference(), arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt\.gguf: architecture 'gpt2' is not supported"):
    gguf_models.resolve(bad_arch, cache=str(cache))
  q81 = _write(tmp_path / "q81.gguf", _reference(), q8_1_tensor=True)
  with pytest.raises(ValueError, match=r"'blk\.0\.ffn_down\.weight' is stored as Q8_1, which the gguf package cannot"):
    gguf_models.resolve(q81, cache=str(cache))
  (tmp_path / "not.gguf").write_bytes(b"this is not a gguf file")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    gguf_models.resolve(str(tmp_path / "not.gguf"), cache=str(cache))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gguf_models.resolve(str(tmp_path / "missing.gguf"), cache=str(cache))
  left = [p for p in os.listdir(cache / "gguf")] if (cache / "gguf").exists() else []
  assert left == [], left


def test_a_conversion_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
  path = _write(tmp_path / "tiny.gguf", _reference())

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(gguf_models.report, "write_json", fail)  # the last file written before the rename
  with pytest.raises(OSError, match="disk full"):
    gguf_models.resolve(path, cache=str(tmp_path / "cache"))
  assert os.listdir(tmp_path / "cache" / "gguf") == []
