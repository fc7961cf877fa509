"""zsRE question answering, as in the paper: each edit gives a question a new answer (one of its
alternatives); the paraphrase is a rephrased question; locality is another question's answer in
training and Natural Questions (data/nq/validation.json) for validation and test. For BART, as
the official README says (data.zsre_nq=False), another zsRE question everywhere.

Variants (the model; official names in mend_jax/paper.py): t5-small (default: google/t5-small-ssm-nq),
t5-large, t5-xl, t5-xxl, bart-base (facebook/bart-base; the paper uses De Cao et al.'s
zsRE-tuned checkpoint, to convert and pass with --config.model.name_or_path).

Run (data files unzipped into data/ as the official README says; the model from the hub cache or a
local directory given with --config.model.name_or_path):
  mend-train --config zsre:t5-small --workdir runs/zsre_t5_small
Any editor: --config.alg=enn (ft, ft_kl, enn, ke; settings in --config.enn.*).
Smoke test, offline on CPU in seconds (a tiny random model of the same family and a tokenizer
trained on the data files; metrics mean nothing):
  mend-train --config zsre:t5-small --workdir /tmp/zsre --config.tiny=True \
      --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives workdir/results.json (edit success, reliability, locality before/after and drawdown, time
per edit) on the official dev file, with the best checkpoint by validation loss on train.n_val
edits held out of the train file.
"""

from mend_jax.configs import common

VARIANTS = ("t5-small", "t5-large", "t5-xl", "t5-xxl", "bart-base")


def get_config(arg: str | None = None):
  """The config of variant `arg` (default t5-small), locked."""
  model = arg or VARIANTS[0]
  if model not in VARIANTS:
    raise ValueError(f"zsre config: variant must be one of {VARIANTS}, got {model!r}")
  return common.paper_config("zsre", model)
