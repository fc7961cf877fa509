"""The paper's experiments: official model names and data layout, and offline "tiny" stand-ins.

The configs (`mend_jax/configs/{zsre,fever,wikitext}.py`) read MODELS and DATA; `experiment.prepare`
builds the tiny stand-ins. Hyperparameters follow the official config/config.yaml and
config/alg/mend.yaml (see `mend_jax.configs.common.paper_config`).

Tiny mode (`config.tiny = True`, or --config.tiny=True): the pretrained model is replaced by a
randomly initialised model of the same family with a shrunk Hugging Face config, and the tokenizer
by one trained offline (the `tokenizers` library) on the task's data files, with the family's
special tokens and templates. The pipeline then runs on CPU in seconds; the numbers mean nothing.
"""

from __future__ import annotations

from typing import Sequence

import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Official names (config/model/*.yaml). The zsRE BART and FEVER BERT numbers of the paper use the
# fine-tuned checkpoints of De Cao et al. (data/zsre/QA_model.ckpt, data/fever/FC_model.ckpt, in
# PyTorch Lightning format): convert one to a Hugging Face directory and pass it as
# --config.model.name_or_path; the hub names below are the untuned base models.
MODELS = {
    "distilgpt2": dict(name="MYX4567/distilgpt2-finetuned-wikitext2", tokenizer="distilgpt2", family="gpt2"),
    "gpt2": dict(name="gpt2", family="gpt2"),
    "gpt2-medium": dict(name="gpt2-medium", family="gpt2"),
    "gpt2-large": dict(name="gpt2-large", family="gpt2"),
    "gpt2-xl": dict(name="gpt2-xl", family="gpt2"),
    "gpt-neo-2.7B": dict(name="EleutherAI/gpt-neo-2.7B", family="gpt_neo"),
    "gpt-j-6B": dict(name="EleutherAI/gpt-j-6B", family="gptj"),
    # The *-ssm-nq T5s: small/xl/xxl are gated-GELU (wi_0, wi_1), large is ReLU (wi).
    "t5-small": dict(name="google/t5-small-ssm-nq", family="t5", tiny={"feed_forward_proj": "gated-gelu"}),
    "t5-large": dict(name="google/t5-large-ssm-nq", family="t5", tiny={"feed_forward_proj": "relu"}),
    "t5-xl": dict(name="google/t5-xl-ssm-nq", family="t5", tiny={"feed_forward_proj": "gated-gelu"}),
    "t5-xxl": dict(name="google/t5-xxl-ssm-nq", family="t5", tiny={"feed_forward_proj": "gated-gelu"}),
    "bart-base": dict(name="facebook/bart-base", family="bart"),
    "bert-base": dict(name="bert-base-uncased", family="bert"),
}

# Which model task each paper task trains (`EditData.from_records(task=...)`).
DATA_TASK = {"zsre": "seq2seq", "fever": "binary", "wikitext": "generation"}

# Official data layout (README: unzip each folder into data/), relative to the working directory.
DATA = {
    "zsre": dict(train_path="data/zsre/structured_zeroshot-train-new_annotated_final.jsonl",
                 test_path="data/zsre/structured_zeroshot-dev-new_annotated_final.jsonl",
                 nq_path="data/nq/validation.json", max_len=32),
    "fever": dict(train_path="data/fever/fever-train-kilt.jsonl", test_path="data/fever/fever-dev-kilt.jsonl",
                  max_len=32),
    # Locality texts: OpenWebText (official default, stas/openwebtext-10k: first 90% train, rest
    # validation; one JSON object per line with "text") or, for distilgpt2 (fine-tuned on
    # wikitext), wikitext-103 raw text with the official filter (>= 50 words, ASCII).
    "wikitext": dict(train_path="data/10token/data/self_sample/train.json",
                     test_path="data/10token/data/self_sample/valid.json",
                     loc_train_path="data/openwebtext/train.jsonl", loc_val_path="data/openwebtext/valid.jsonl",
                     min_words=0, max_len=200),
}


# ---------------------------------------------------------------------------- tiny stand-ins


def tiny_tokenizer(family: str, texts: Sequence[str], vocab_size: int = 400):
  """A tokenizer of the family's kind trained on `texts` (offline), as PreTrainedTokenizerFast:
  gpt2/gpt_neo/gptj: byte-level BPE, <|endoftext|> as bos/eos/unk and no pad token (as GPT-2);
  bart: byte-level BPE, <s> <pad> </s> <unk> <mask> = 0..4, "<s> text </s>";
  t5: Metaspace BPE, <pad> </s> <unk> = 0..2, "text </s>";
  bert: lower-cased WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, "[CLS] text [SEP]"."""
  texts = [t for t in texts if t]
  if family in ("gpt2", "gpt_neo", "gptj", "bart"):
    specials = ["<|endoftext|>"] if family != "bart" else ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  elif family == "t5":
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
  elif family == "bert":
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
  else:
    raise ValueError(f"no tiny tokenizer for family {family!r}")
  tok.train_from_iterator(texts, trainer=trainer)
  if family == "bart":
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    kw = dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
  elif family == "t5":
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  elif family == "bert":
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    kw = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  else:
    kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
  return tf.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tiny_hf_config(family: str, tokenizer, max_len: int, overrides=None):
  """A shrunk Hugging Face config of the family's class: width 16, 2 heads, one block (encoder and
  decoder; GPT-Neo two, one global and one local), so the default editable layers are that block's
  MLP matrices. Small, because compilation dominates a tiny run."""
  t = tokenizer
  common = dict(vocab_size=len(t), pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                eos_token_id=t.eos_token_id)
  if family == "gpt2":
    cls, kw = tf.GPT2Config, dict(n_positions=max_len, n_embd=16, n_layer=1, n_head=2)
  elif family == "gpt_neo":
    cls, kw = tf.GPTNeoConfig, dict(max_position_embeddings=max_len, hidden_size=16, num_layers=2, num_heads=2,
                                    attention_types=[[["global", "local"], 1]], window_size=8)
  elif family == "gptj":
    cls, kw = tf.GPTJConfig, dict(n_positions=max_len, n_embd=16, n_layer=1, n_head=2, rotary_dim=4)
  elif family == "t5":
    cls, kw = tf.T5Config, dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=t.pad_token_id)
  elif family == "bart":
    cls, kw = tf.BartConfig, dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                  max_position_embeddings=max_len, decoder_start_token_id=t.eos_token_id,
                                  forced_eos_token_id=t.eos_token_id)
  elif family == "bert":
    cls, kw = tf.BertConfig, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=max_len, num_labels=1)
  else:
    raise ValueError(f"no tiny config for family {family!r}")
  kw = {**common, **kw}
  for k, val in dict(overrides or {}).items():
    if not hasattr(cls(), k):
      raise ValueError(f"model.tiny.{k}: {cls.__name__} has no field {k!r}")
    kw[k] = val  # passed to the constructor, which derives other fields (e.g. T5's gated act) from it
  return cls(**kw)


def record_texts(records: Sequence[dict], limit: int = 20000) -> list[str]:
  """The strings of (up to `limit`) records, to train a tiny tokenizer on."""
  out = []
  for r in records[:limit]:
    for k in ("src", "alt", "rephrase", "loc", "loc_ans", "answers"):
      v = r.get(k)
      out.extend(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str))
  return out
