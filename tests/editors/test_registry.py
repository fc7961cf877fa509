"""The editor registry: every name builds its editor with its config; bad names and keys are
clear errors."""

import jax
import jax.numpy as jnp
import pytest

from conftest import make_batch, tiny_model
from mend_jax import editors
from mend_jax.editors import ENN, FT, KE, MEND, Editor, ENNConfig, FTConfig, FTKLConfig, KEConfig, MENDConfig


def test_registry_builds_every_editor_with_its_config():
  model = tiny_model("gpt2")
  assert editors.NAMES == ("mend", "ft", "ft_kl", "enn", "ke")
  expect = {"mend": (MEND, MENDConfig), "ft": (FT, FTConfig), "ft_kl": (FT, FTKLConfig), "enn": (ENN, ENNConfig),
            "ke": (KE, KEConfig)}
  for name, (cls, cfg_cls) in expect.items():
    ed = editors.make(name, model, {})
    assert type(ed) is cls and type(ed.cfg) is cfg_cls and isinstance(ed, Editor)
    assert ed.name == name and ed.model is model and editors.config_class(name) is cfg_cls
    assert ed.learned == (name in ("mend", "enn", "ke"))
    assert ed.needs_loc_pool == (name == "ft_kl")
  assert editors.make("mend", model, MENDConfig(rank=4)).cfg.rank == 4  # an instance is used as is
  assert editors.make("mend", model, {"rank": 4}).cfg.rank == 4


def test_bad_names_keys_and_values_are_clear_errors():
  model = tiny_model("gpt2")
  with pytest.raises(ValueError, match="unknown editor 'rome'"):
    editors.make("rome", model, {})
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['ft.c_edit'\]"):
    editors.make("ft", model, {"c_edit": 0.1})  # only FT+KL has an edit weight
  with pytest.raises(ValueError, match=r"\['mend.ranq'\]"):
    editors.make("mend", model, {"ranq": 4})
  with pytest.raises(ValueError, match="opt must be one of"):
    editors.make("ft", model, {"opt": "lbfgs"})
  with pytest.raises(ValueError, match="loc_ref must be one of"):
    editors.make("enn", model, {"loc_ref": "theta"})
  with pytest.raises(TypeError, match="needs an EditableModel"):
    editors.make("ke", "gpt2", {})
  with pytest.raises(TypeError, match="MEND needs a MENDConfig"):
    MEND(model, FTConfig())
  ftkl = editors.make("ft_kl", model)
  state = ftkl.init(jax.random.PRNGKey(0), model.params)
  with pytest.raises(ValueError, match="needs a locality pool"):
    ftkl.edit(state, model.params, make_batch(model))
  with pytest.raises(ValueError, match="missing"):
    ftkl.with_loc_pool(state, {"input_ids": jnp.zeros((4, 3), jnp.int32)})
