"""FEVER fact-checking, as in the paper: each edit sets a claim's SUPPORTS/REFUTES label
(flipped with p = 0.5); the paraphrase is a rephrased claim; locality is the Bernoulli KL on
other claims.

Variant: bert-base (default: bert-base-uncased with a one-logit head; the paper uses De Cao et
al.'s FEVER-tuned classifier, to convert and pass with --config.model.name_or_path).

Run (data files unzipped into data/ as the official README says):
  mend-train --config fever --workdir runs/fever_bert_base
Smoke test, offline on CPU in seconds (metrics mean nothing):
  mend-train --config fever --workdir /tmp/fever --config.tiny=True \
      --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives workdir/results.json on the official dev file (see zsre.py for the fields).
"""

from mend_jax.configs import common

VARIANTS = ("bert-base",)


def get_config(arg: str | None = None):
  """The config of variant `arg` (default bert-base), locked."""
  model = arg or VARIANTS[0]
  if model not in VARIANTS:
    raise ValueError(f"fever config: variant must be one of {VARIANTS}, got {model!r}")
  return common.paper_config("fever", model)
