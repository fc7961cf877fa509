"""MEND on Wikitext generation with GPT-2 medium (gpt2-medium), as in the paper.

Wikitext generation: each edit makes the model produce its own 10-token self-sampled
continuation of a wikitext passage (data/10token/data/self_sample/{train,valid}.json);
the paraphrase drops a random prefix; locality is the KL at every token of held-out text
(data.loc_train_path / data.loc_val_path).

Run (data files unzipped into data/ as the official README says; the model from the hub cache or a
local directory given with --config.model.name_or_path):
  python scripts/train.py --config configs/wikitext_gpt2_medium.py --workdir runs/wikitext_gpt2_medium
Smoke test, offline on CPU in seconds (a tiny random model of the same family and a tokenizer
trained on the data files; metrics mean nothing):
  python scripts/train.py --config configs/wikitext_gpt2_medium.py --workdir /tmp/wikitext_gpt2_medium \
      --config.tiny=True --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives: workdir/results.json (edit success, reliability, locality before/after and drawdown, time per
edit) on the official dev/valid file, with the best checkpoint by validation loss on train.n_val
edits held out of the train file. Hyperparameters: mend_jax/paper.py (official MEND settings).
"""

from mend_jax import paper


def get_config():
  return paper.get_config("wikitext", "gpt2-medium")
