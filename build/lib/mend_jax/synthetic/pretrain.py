"""Pretrain a tiny GPT-2 on the synthetic world so that it knows every true fact.

MEND edits a model that already holds knowledge; with no model hub offline,
we make one: a few-layer GPT-2 trained as a causal LM on ``pretrain.txt``
(every fact in every phrasing, for train, val and test subjects alike).

Sequences are ``[bos] + tokens`` right-padded to a fixed length; the loss is
the token-mean NLL over real tokens (`losses.nll` of `EditableModel.logits`, the
forward pass every editor uses). Some examples drop the bos (``drop_bos_prob``)
so the model also answers when a caller feeds the bare prompt starting at
position 0, as the GPT-2 tokenizer convention (no automatic bos) invites.

``out_dir`` ends up loadable with ``FlaxGPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained``; ``pretrain_done.json``, written last, holds
the config, a fingerprint of the data and the final metrics, and marks the
directory as finished so later calls reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from transformers import AutoTokenizer, GPT2Config

from mend_jax import losses, models, report
from mend_jax.synthetic import benchmark
from mend_jax.synthetic.world import World, config_to_dict, fact_sentence, iter_facts

DONE_FILE = "pretrain_done.json"


@dataclass(frozen=True)
class PretrainConfig:
  """Model size and optimisation schedule.

  The defaults learn every fact of the default world (teacher-forced accuracy
  ~1.0, with and without bos) in about 1-1.5 minutes on 2 CPU cores.
  Memorisation shows a sharp jump late in training, so there is little
  warning before it fails: measured on the default world, 2 layers with
  drop_bos_prob=0.5 reach 0.91 at 2000 steps and 1.0 at 3000; with
  drop_bos_prob=0 they reach 1.0 by 1500 steps but only ~0.89 without bos;
  0.2 at 2400 steps gets 1.0 both ways. A 4-layer model costs twice as much
  per step and was far from done at the same budget, hence 2 layers.

  n_positions must cover the longest sentence plus bos. drop_bos_prob: the
  share of training examples fed without the leading bos token, so that the
  model also answers a bare prompt starting at position 0.
  """

  n_layer: int = 2
  n_embd: int = 128
  n_head: int = 4
  n_positions: int = 32
  batch_size: int = 64
  steps: int = 2400
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  end_lr_fraction: float = 0.05  # cosine decays to this share of the peak
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  drop_bos_prob: float = 0.2
  eval_batch_size: int = 512
  seed: int = 0


def _validate(cfg: PretrainConfig) -> None:
  """Raise ValueError naming the first bad field of ``cfg``."""
  for name in ("n_layer", "n_embd", "n_head", "n_positions", "batch_size", "steps", "eval_batch_size"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"PretrainConfig.{name}={getattr(cfg, name)}: must be >= 1")
  if cfg.n_embd % cfg.n_head:
    raise ValueError(f"PretrainConfig.n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
  if not 0 <= cfg.warmup_steps < cfg.steps:
    raise ValueError(
      f"PretrainConfig.warmup_steps={cfg.warmup_steps}: need 0 <= warmup_steps < steps={cfg.steps}")
  if not 0.0 <= cfg.drop_bos_prob <= 1.0:
    raise ValueError(f"PretrainConfig.drop_bos_prob={cfg.drop_bos_prob}: need in [0, 1]")
  if cfg.learning_rate <= 0:
    raise ValueError(f"PretrainConfig.learning_rate={cfg.learning_rate}: must be > 0")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def encode_texts(tok, texts: Sequence[str], seq_len: int,
                 add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Tokenize and right-pad ``texts``.

  Returns (input_ids [N, seq_len] int32, attention_mask [N, seq_len] int32);
  with ``add_bos`` each row starts with ``tok.bos_token_id``. Raises
  ValueError naming the first text that does not fit in ``seq_len``.
  """
  enc = tok(list(texts), add_special_tokens=False)["input_ids"]
  prefix = [tok.bos_token_id] if add_bos else []
  ids = np.full((len(enc), seq_len), tok.pad_token_id, dtype=np.int32)
  mask = np.zeros((len(enc), seq_len), dtype=np.int32)
  for i, row in enumerate(enc):
    row = prefix + row
    if len(row) > seq_len:
      raise ValueError(
        f"text {texts[i]!r} has {len(row)} tokens (with bos={add_bos}), more than seq_len={seq_len}")
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask


def _drop_bos(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Shift rows left by one (removing bos) and pad the freed last column. Shapes kept: [N, T]."""
  ids2 = np.concatenate([ids[:, 1:], np.full_like(ids[:, :1], pad_id)], axis=1)
  mask2 = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
  return ids2, mask2


def _fingerprint(data_dir: Path) -> str:
  """sha256 over pretrain.txt and the tokenizer: a retrain trigger if the data changes."""
  h = hashlib.sha256()
  for p in (data_dir / "pretrain.txt", data_dir / "tokenizer" / "tokenizer.json"):
    h.update(p.read_bytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------


def _gpt2_config(cfg: PretrainConfig, tok) -> GPT2Config:
  return GPT2Config(
    vocab_size=len(tok),
    n_positions=cfg.n_positions,
    n_embd=cfg.n_embd,
    n_layer=cfg.n_layer,
    n_head=cfg.n_head,
    # No dropout: the goal is exact memorisation, and deterministic forward passes.
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
  )


def lm_loss(model: models.EditableModel, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Next-token NLL, token mean over the real tokens after the first. ids, mask: [B, T]. Scalar."""
  batch = {"input_ids": ids, "attention_mask": mask, "labels": jnp.where(mask != 0, ids, losses.IGNORE)}
  return losses.nll("causal_lm", model.logits(params, batch), batch)


def _optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=cfg.steps,
    end_value=cfg.learning_rate * cfg.end_lr_fraction,
  )
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay),
  )


def _make_train_step(model: models.EditableModel, optimizer):
  """One jitted step: (params, opt_state, ids [B,T], mask [B,T]) -> (params, opt_state, loss)."""

  @jax.jit
  def step(params, opt_state, ids, mask):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(model, p, ids, mask))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _batches(rng: np.random.Generator, n: int, batch_size: int):
  """Endless index batches [batch_size]: shuffled epochs, the tail carried over."""
  buf = np.empty(0, dtype=np.int64)
  while True:
    while len(buf) < batch_size:
      buf = np.concatenate([buf, rng.permutation(n)])
    yield buf[:batch_size]
    buf = buf[batch_size:]


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def fact_accuracy(model: models.EditableModel, params, tok, world: World, seq_len: int, add_bos: bool = True,
                  batch_size: int = 512) -> dict:
  """Teacher-forced accuracy of the true object over every (subject, relation, template).

  A fact counts as known when the argmax at the last prompt position is the
  object token. Returns {"all": acc, "split/<name>": acc, "template/<i>": acc,
  "relation/<name>": acc, "n_facts": N}.
  """
  facts = iter_facts(world)
  texts = [fact_sentence(f.prompt, f.target) for f in facts]
  ids, mask = encode_texts(tok, texts, seq_len, add_bos=add_bos)
  lengths = mask.sum(axis=1)
  pos = lengths - 2  # the object is the last real token; it is predicted one step before
  target = ids[np.arange(len(ids)), lengths - 1]

  @jax.jit
  def predict(params, ids_b, mask_b, pos_b):  # params as an argument, not baked in as constants
    logits = model.logits(params, {"input_ids": ids_b, "attention_mask": mask_b})
    return jnp.argmax(logits[jnp.arange(ids_b.shape[0]), pos_b], axis=-1)

  preds = []
  for start in range(0, len(ids), batch_size):
    sl = slice(start, start + batch_size)
    b_ids, b_mask, b_pos = ids[sl], mask[sl], pos[sl]
    n = len(b_ids)
    if n < batch_size:  # pad the last batch so that predict compiles once
      pad = batch_size - n
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], pad, axis=0)])
      b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], pad, axis=0)])
      b_pos = np.concatenate([b_pos, np.repeat(b_pos[:1], pad, axis=0)])
    preds.append(np.asarray(predict(params, b_ids, b_mask, b_pos))[:n])
  correct = np.concatenate(preds) == target

  split_of = {s: name for name, subs in world.splits.items() for s in subs}
  groups: dict[str, list[bool]] = {"all": []}
  for f, ok in zip(facts, correct):
    for key in ("all", f"split/{split_of.get(f.subject, 'none')}", f"template/{f.template_index}",
                f"relation/{f.relation}"):
      groups.setdefault(key, []).append(bool(ok))
  out = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
  out["n_facts"] = len(facts)
  return out


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _read_done(out_dir: Path) -> dict | None:
  """The finished-run marker of ``out_dir``, or None if absent or unreadable."""
  try:
    with open(out_dir / DONE_FILE, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def pretrain(data_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: PretrainConfig = PretrainConfig(),
             *, progress: Callable[[int, int, dict], None] | None = None) -> Path:
  """Train a GPT-2 on ``{data_dir}/pretrain.txt``; save model + tokenizer to ``out_dir``.

  ``data_dir`` is a directory written by `benchmark.write_benchmark`. Skips all work when
  ``out_dir/pretrain_done.json`` records the same config and data fingerprint. `progress(step,
  total, {"loss": loss})`, if given, is called every 50 steps (the command line draws a bar).
  Returns ``Path(out_dir)``.
  """
  _validate(cfg)
  data_dir, out_dir = Path(data_dir), Path(out_dir)
  for need in ("pretrain.txt", "world.json", "tokenizer/tokenizer.json"):
    if not (data_dir / need).is_file():
      raise FileNotFoundError(
        f"{data_dir / need} not found; run benchmark.write_benchmark({str(data_dir)!r}) first")
  fingerprint = _fingerprint(data_dir)
  cfg_dict = dataclasses.asdict(cfg)
  done = _read_done(out_dir)
  if (done and done.get("config") == cfg_dict and done.get("data_fingerprint") == fingerprint
      and (out_dir / "flax_model.msgpack").is_file()):
    return out_dir

  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / DONE_FILE).unlink(missing_ok=True)  # stale until this run finishes

  tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
  world = benchmark.load_world(data_dir)
  lines = [ln for ln in (data_dir / "pretrain.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
  ids, mask = encode_texts(tok, lines, cfg.n_positions)
  # Trim to the longest row: shorter sequences are cheaper, and positions are absolute anyway.
  seq_len = int(mask.sum(axis=1).max())
  ids, mask = ids[:, :seq_len], mask[:, :seq_len]
  ids_nb, mask_nb = _drop_bos(ids, mask, tok.pad_token_id)

  model = models.model_from_config(_gpt2_config(cfg, tok), seed=cfg.seed)
  params = model.params
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
  logging.info("pretraining a %d-layer GPT-2 (%d parameters) on %d sentences", cfg.n_layer, n_params, len(ids))
  optimizer = _optimizer(cfg)
  opt_state = optimizer.init(params)
  step_fn = _make_train_step(model, optimizer)

  rng = np.random.default_rng(cfg.seed)
  batches = _batches(rng, len(ids), cfg.batch_size)
  curve = []
  t0 = time.perf_counter()
  for step in range(cfg.steps):
    idx = next(batches)
    drop = rng.random(len(idx)) < cfg.drop_bos_prob
    b_ids = np.where(drop[:, None], ids_nb[idx], ids[idx])
    b_mask = np.where(drop[:, None], mask_nb[idx], mask[idx])
    params, opt_state, loss = step_fn(params, opt_state, b_ids, b_mask)
    curve.append(loss)
    # Reading the loss blocks on the device; do it rarely to keep dispatch async.
    if progress is not None and (step % 50 == 0 or step == cfg.steps - 1):
      progress(step + 1, cfg.steps, {"loss": float(loss)})
  curve = np.asarray(jax.device_get(curve), dtype=np.float64)
  train_seconds = time.perf_counter() - t0
  if not np.all(np.isfinite(curve)):
    bad = int(np.argmin(np.isfinite(curve)))
    raise FloatingPointError(f"pretraining diverged: non-finite loss at step {bad}; lower learning_rate")

  t1 = time.perf_counter()
  acc = fact_accuracy(model, params, tok, world, seq_len, add_bos=True, batch_size=cfg.eval_batch_size)
  acc_nb = fact_accuracy(model, params, tok, world, seq_len, add_bos=False, batch_size=cfg.eval_batch_size)
  eval_seconds = time.perf_counter() - t1

  model.hf_model.save_pretrained(str(out_dir), params=params)
  tok.save_pretrained(str(out_dir))
  k = max(1, min(20, cfg.steps // 10))  # average a few steps: single-batch losses are noisy
  metrics = {
    "n_params": n_params,
    "seq_len": seq_len,
    "n_sentences": len(ids),
    "loss_first": float(curve[:k].mean()),
    "loss_last": float(curve[-k:].mean()),
    "train_seconds": round(train_seconds, 2),
    "eval_seconds": round(eval_seconds, 2),
    "fact_accuracy": acc,
    "fact_accuracy_no_bos": acc_nb,
  }
  report.write_json(out_dir / DONE_FILE, {
    "config": cfg_dict,
    "data_fingerprint": fingerprint,
    "world_config": config_to_dict(world.config),
    "metrics": metrics,
    "loss_curve": [round(float(x), 4) for x in curve[:: max(1, cfg.steps // 100)]],
  }, indent=1)
  logging.info("pretraining done in %.0f s: fact accuracy %.3f (without bos %.3f)", train_seconds,
               acc["all"], acc_nb["all"])
  return out_dir


def load_pretrained(model_dir: str | os.PathLike) -> tuple[models.EditableModel, object]:
  """(EditableModel, tokenizer) from a directory written by `pretrain`."""
  model_dir = Path(model_dir)
  if not (model_dir / DONE_FILE).is_file():
    raise FileNotFoundError(
      f"{model_dir / DONE_FILE} not found: {model_dir} holds no finished pretrained model")
  return models.load_model(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))
