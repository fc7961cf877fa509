"""The tiny base model of the synthetic benchmark: it trains, saves, loads and caches."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mend_jax import models
from mend_jax.synthetic import benchmark, world
from mend_jax.synthetic import pretrain as pt
from mend_jax.synthetic.world import WorldConfig

TINY = WorldConfig(seed=3, n_subjects=20, n_objects_per_relation=6)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  return out, benchmark.write_benchmark(out, TINY)


def test_pretrain_tiny_model_loads_and_learns(bench, tmp_path):
  data_dir, _ = bench
  cfg = pt.PretrainConfig(n_layer=1, n_embd=32, n_head=2, batch_size=32, steps=40, warmup_steps=4,
                          learning_rate=3e-3, eval_batch_size=128)
  out = pt.pretrain(data_dir, tmp_path / "model", cfg, progress=None)
  done = json.loads((out / pt.DONE_FILE).read_text(encoding="utf-8"))
  m = done["metrics"]
  assert m["loss_last"] < m["loss_first"]
  assert 0.0 <= m["fact_accuracy"]["all"] <= 1.0 and m["fact_accuracy"]["n_facts"] == len(
    world.iter_facts(benchmark.load_world(data_dir)))
  assert done["config"]["steps"] == 40

  model, tok = pt.load_pretrained(out)
  assert isinstance(model, models.EditableModel)
  assert model.config.vocab_size == len(tok) and model.config.n_layer == 1
  ids = np.array([[tok.bos_token_id] + tok("The capital of X is")["input_ids"]], dtype=np.int32)
  logits = model.logits(model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
  assert logits.shape == (1, ids.shape[1], len(tok))

  # Second call with the same config is a cache hit: the marker is not rewritten.
  stamp = (out / pt.DONE_FILE).stat().st_mtime_ns
  pt.pretrain(data_dir, out, cfg, progress=None)
  assert (out / pt.DONE_FILE).stat().st_mtime_ns == stamp


def test_encode_texts_rejects_too_long(bench):
  _, paths = bench
  tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  ids, mask = pt.encode_texts(tok, ["The capital of", "is"], seq_len=5)
  assert ids.shape == mask.shape == (2, 5)
  assert ids[0, 0] == tok.bos_token_id and mask[0].tolist() == [1, 1, 1, 1, 0]
  with pytest.raises(ValueError, match="seq_len=3"):
    pt.encode_texts(tok, ["The capital of"], seq_len=3)
