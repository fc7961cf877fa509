"""Compatibility patches for Flax models in transformers 4.x under current JAX.

Flax T5 (and LongT5) in transformers 4.x call ``jnp.clip(x, a_max=...)``; JAX 0.10 removed the
``a_min``/``a_max`` keywords, so those models fail at their first forward pass. We swap the ``jnp``
name inside those two modules only for a thin proxy whose ``clip`` accepts the old keywords. Nothing
else in JAX or transformers is touched.

transformers 4.x also warns, at the first Flax model, that its Flax classes will be removed in v5;
this project pins transformers<5 for exactly those classes, so that one message is filtered out.
"""

from __future__ import annotations

import importlib
import logging
import types

import jax.numpy as jnp


def _clip(x, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002 - mirrors jnp.clip
  lo = min if min is not None else a_min
  hi = max if max is not None else a_max
  return jnp.clip(x, lo, hi)


class _JnpWithOldClip(types.ModuleType):
  """Delegates every attribute to jax.numpy except ``clip``."""

  def __init__(self):
    super().__init__("jax.numpy")

  def __getattr__(self, name):
    return getattr(jnp, name)

  clip = staticmethod(_clip)


_PATCHED_MODULES = (
    "transformers.models.t5.modeling_flax_t5",
    "transformers.models.longt5.modeling_flax_longt5",
)


class _NoFlaxDeprecation(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "TensorFlow and JAX classes are deprecated" not in record.getMessage()


def patch_transformers_flax() -> None:
  """Idempotently applies the T5 ``jnp.clip`` fix (a no-op if the modules cannot be imported) and
  filters the Flax deprecation message."""
  log = logging.getLogger("transformers.modeling_flax_utils")
  if not any(isinstance(f, _NoFlaxDeprecation) for f in log.filters):
    log.addFilter(_NoFlaxDeprecation())
  for name in _PATCHED_MODULES:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if not isinstance(getattr(module, "jnp", None), _JnpWithOldClip):
      module.jnp = _JnpWithOldClip()
