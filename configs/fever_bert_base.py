"""MEND on FEVER fact-checking with BERT-base (bert-base-uncased; the paper uses De Cao et al.'s FEVER-tuned classifier), as in the paper.

FEVER fact-checking: each edit sets a claim's SUPPORTS/REFUTES label (flipped with p = 0.5);
the paraphrase is a rephrased claim; locality is the Bernoulli KL on other claims.

Run (data files unzipped into data/ as the official README says; the model from the hub cache or a
local directory given with --config.model.name_or_path):
  python scripts/train.py --config configs/fever_bert_base.py --workdir runs/fever_bert_base
Smoke test, offline on CPU in seconds (a tiny random model of the same family and a tokenizer
trained on the data files; metrics mean nothing):
  python scripts/train.py --config configs/fever_bert_base.py --workdir /tmp/fever_bert_base \
      --config.tiny=True --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives: workdir/results.json (edit success, reliability, locality before/after and drawdown, time per
edit) on the official dev/valid file, with the best checkpoint by validation loss on train.n_val
edits held out of the train file. Hyperparameters: mend_jax/paper.py (official MEND settings).
"""

from mend_jax import paper


def get_config():
  return paper.get_config("fever", "bert-base")
