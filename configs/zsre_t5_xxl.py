"""MEND on zsRE question answering with T5-XXL fine-tuned on NQ (google/t5-xxl-ssm-nq), as in the paper.

zsRE question answering: each edit gives a question a new answer (one of its alternatives);
the paraphrase is a rephrased question; locality is another question's answer in training and
Natural Questions (data/nq/validation.json) for validation and test.

Run (data files unzipped into data/ as the official README says; the model from the hub cache or a
local directory given with --config.model.name_or_path):
  python scripts/train.py --config configs/zsre_t5_xxl.py --workdir runs/zsre_t5_xxl
Smoke test, offline on CPU in seconds (a tiny random model of the same family and a tokenizer
trained on the data files; metrics mean nothing):
  python scripts/train.py --config configs/zsre_t5_xxl.py --workdir /tmp/zsre_t5_xxl \
      --config.tiny=True --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives: workdir/results.json (edit success, reliability, locality before/after and drawdown, time per
edit) on the official dev/valid file, with the best checkpoint by validation loss on train.n_val
edits held out of the train file. Hyperparameters: mend_jax/paper.py (official MEND settings).
"""

from mend_jax import paper


def get_config():
  return paper.get_config("zsre", "t5-xxl")
