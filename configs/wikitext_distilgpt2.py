"""MEND on Wikitext generation with distilGPT-2 fine-tuned on wikitext (MYX4567/distilgpt2-finetuned-wikitext2, tokenizer distilgpt2), as in the paper.

Wikitext generation: each edit makes the model produce its own 10-token self-sampled
continuation of a wikitext passage (data/10token/data/self_sample/{train,valid}.json);
the paraphrase drops a random prefix; locality is the KL at every token of held-out text
(data.loc_train_path / data.loc_val_path). This model was fine-tuned on wikitext, so, as the
official README says (data.wiki_webtext=False), its locality texts are wikitext-103 raw
(data/wikitext/wiki.{train,valid}.raw, paragraphs of >= 50 words, ASCII) instead of OpenWebText.

Run (data files unzipped into data/ as the official README says; the model from the hub cache or a
local directory given with --config.model.name_or_path):
  python scripts/train.py --config configs/wikitext_distilgpt2.py --workdir runs/wikitext_distilgpt2
Smoke test, offline on CPU in seconds (a tiny random model of the same family and a tokenizer
trained on the data files; metrics mean nothing):
  python scripts/train.py --config configs/wikitext_distilgpt2.py --workdir /tmp/wikitext_distilgpt2 \
      --config.tiny=True --config.train.max_steps=10 --config.train.n_val=4 --config.eval.n_test=4
Gives: workdir/results.json (edit success, reliability, locality before/after and drawdown, time per
edit) on the official dev/valid file, with the best checkpoint by validation loss on train.n_val
edits held out of the train file. Hyperparameters: mend_jax/paper.py (official MEND settings).
"""

from mend_jax import paper


def get_config():
  return paper.get_config("wikitext", "distilgpt2")
