"""The offline synthetic benchmark: an invented world of facts (`world`), its files on disk
(`benchmark`: edit records, tokenizer, pretraining text) and a tiny GPT-2 pretrained on them
(`pretrain`), so the whole pipeline runs, and means something, with no network."""

from mend_jax.synthetic import benchmark, pretrain, world
from mend_jax.synthetic.benchmark import load_records, load_world, write_benchmark
from mend_jax.synthetic.pretrain import PretrainConfig
from mend_jax.synthetic.world import WorldConfig

__all__ = ["benchmark", "pretrain", "world", "load_records", "load_world", "write_benchmark", "PretrainConfig",
           "WorldConfig"]
