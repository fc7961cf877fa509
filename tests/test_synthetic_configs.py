"""configs/synthetic_long.py is the demo config with only its documented training overrides."""

from conftest import load_config


def test_long_config_changes_only_the_training_schedule():
  demo, long = load_config("synthetic_demo").to_dict(), load_config("synthetic_long").to_dict()
  changed = {k for k in demo["train"] if demo["train"][k] != long["train"][k]}
  assert changed == {"lr", "max_steps", "patience", "n_val"}
  assert (long["train"]["lr"], long["train"]["max_steps"], long["train"]["patience"], long["train"]["n_val"]) == (
      1e-4, 16000, 8, 256)
  assert {k: v for k, v in demo.items() if k != "train"} == {k: v for k, v in long.items() if k != "train"}
