"""configs/synthetic_long.py is the demo config with only its documented training overrides."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config().to_dict()


def test_long_config_changes_only_the_training_schedule():
  demo, long = _load("synthetic_demo"), _load("synthetic_long")
  changed = {k for k in demo["train"] if demo["train"][k] != long["train"][k]}
  assert changed == {"lr", "max_steps", "patience", "n_val"}
  assert (long["train"]["lr"], long["train"]["max_steps"], long["train"]["patience"], long["train"]["n_val"]) == (
      1e-4, 16000, 8, 256)
  assert {k: v for k, v in demo.items() if k != "train"} == {k: v for k, v in long.items() if k != "train"}
