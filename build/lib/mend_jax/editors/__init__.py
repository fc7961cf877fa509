"""Editors by name: MEND and the paper's baselines, behind one interface (`editors.base.Editor`).

  editor = editors.make("enn", model, {"edit_lr": 1e-2})

| name  | class | config      | what it does                                                         |
|-------|-------|-------------|----------------------------------------------------------------------|
| mend  | MEND  | MENDConfig  | learned low-rank transform of the rank-1 gradient factors (the paper)  |
| ft    | FT    | FTConfig    | fine-tunes the editable matrices until the edit succeeds              |
| ft_kl | FT    | FTKLConfig  | the same with a KL locality term on sampled locality data             |
| enn   | ENN   | ENNConfig   | trains the whole model for editability; one learned inner step        |
| ke    | KE    | KEConfig    | a BiLSTM reads the edit and masks, offsets and gates the gradient     |
"""

from __future__ import annotations

from typing import Any, Mapping

from mend_jax.editors.base import Editor, EditorState, build_config, jit_edit, update_norms
from mend_jax.editors.enn import ENN, ENNConfig
from mend_jax.editors.ft import FT, FTConfig, FTKLConfig
from mend_jax.editors.ke import KE, KEConfig
from mend_jax.editors.mend import MEND
from mend_jax.editors.mend_net import MENDConfig
from mend_jax.models import EditableModel

REGISTRY: dict[str, tuple[type[Editor], type]] = {
    "mend": (MEND, MENDConfig),
    "ft": (FT, FTConfig),
    "ft_kl": (FT, FTKLConfig),
    "enn": (ENN, ENNConfig),
    "ke": (KE, KEConfig),
}
NAMES = tuple(REGISTRY)


def config_class(name: str) -> type:
  """The config dataclass of editor `name`."""
  _check_name(name)
  return REGISTRY[name][1]


def make(name: str, model: EditableModel, cfg: Mapping[str, Any] | Any | None = None) -> Editor:
  """The editor `name` (one of NAMES) for `model`, configured by `cfg` (a mapping of its config
  class's fields, or an instance). Unknown names or keys raise ValueError naming them."""
  _check_name(name)
  cls, cfg_cls = REGISTRY[name]
  return cls(model, build_config(cfg_cls, cfg, name))


def _check_name(name: str) -> None:
  if name not in REGISTRY:
    raise ValueError(f"unknown editor {name!r}; expected one of {NAMES}")


__all__ = ["Editor", "EditorState", "NAMES", "REGISTRY", "config_class", "make", "jit_edit", "build_config",
           "update_norms", "MEND", "MENDConfig", "FT", "FTConfig", "FTKLConfig", "ENN", "ENNConfig", "KE",
           "KEConfig"]
