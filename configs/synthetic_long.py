"""The offline demo's benchmark with a longer, slower MEND training run: lr 1e-4 instead of 3e-4,
up to 16000 micro-steps, validation on 256 edits with patience 8.

  python scripts/train.py --config configs/synthetic_long.py --workdir runs/synthetic_long

Everything else (world, base model, editor, evaluation) is configs/synthetic_demo.py's.
Measured (docs/compare.md, 2026-11-21, 2 CPU cores, about 10 minutes of training): best
checkpoint at step 10500, early stop at 14500; edit success 0.952, reliability 0.952, drawdown
0.017 on the 480 test edits (the demo config: 0.917 / 0.921 / 0.019).
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_demo.py")
  spec = importlib.util.spec_from_file_location("synthetic_demo_config", path)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config()
  c.train.update(lr=1e-4, max_steps=16000, patience=8, n_val=256)
  return c
