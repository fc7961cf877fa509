"""Wikitext generation, as in the paper: each edit makes the model produce its own 10-token
self-sampled continuation of a wikitext passage (data/10token/data/self_sample/{train,valid}.json);
the paraphrase drops a random prefix; locality is the KL at every token of held-out text
(data.loc_train_path / data.loc_val_path: OpenWebText; for distilgpt2, fine-tuned on wikitext,
wikitext-103 raw text, as the official README says).

Variants (official names in mend_jax/paper.py): distilgpt2 (default), gpt2, gpt2-medium,
gpt2-large, gpt2-xl, gpt-neo-2.7B, gpt-j-6B.

Run (data files unzipped into data/ as the official README says):
  mend-train --config wikitext:gpt2 --workdir runs/wikitext_gpt2
Smoke test, offline on CPU in seconds (metrics mean nothing):
  mend-train --config wikitext:gpt2 --workdir /tmp/wikitext --config.tiny=True \
      --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives workdir/results.json on the official valid file, with locality perplexity before and after.
"""

from mend_jax.configs import common

VARIANTS = ("distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-neo-2.7B", "gpt-j-6B")


def get_config(arg: str | None = None):
  """The config of variant `arg` (default distilgpt2), locked."""
  model = arg or VARIANTS[0]
  if model not in VARIANTS:
    raise ValueError(f"wikitext config: variant must be one of {VARIANTS}, got {model!r}")
  return common.paper_config("wikitext", model)
