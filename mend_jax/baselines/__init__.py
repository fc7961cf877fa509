"""Baseline editors of the paper, each implementing `algs.EditorAlg`: FT and FT+KL (fine-tuning),
ENN (editable training) and KE (KnowledgeEditor)."""

from mend_jax.baselines.enn import ENN, ENNConfig
from mend_jax.baselines.ft import FT, FTConfig, FTKLConfig
from mend_jax.baselines.ke import KE, KEConfig

__all__ = ["ENN", "FT", "KE", "ENNConfig", "FTConfig", "FTKLConfig", "KEConfig"]
