"""Task losses and metrics (pure functions of logits and a batch), and Algorithm 1's outer loss.

Which tokens count:
  causal_lm: logits[:, t] predicts labels[:, t+1]; a token is scored where labels != -100.
  seq2seq:   logits[:, t] predicts labels[:, t] (decoder positions); scored where labels != -100.
  binary:    one logit per example, labels in {0, 1}.
Two NLLs: `nll` is the token mean over every scored token of a batch (L_e of the paraphrase,
as the paper's code); `nll_per_edit_sum` is the sum over the batch's examples of each one's
token mean, the loss an edit differentiates, so that one edit's gradient is the same alone or
among k edits.

Locality KL(p_base || p_edited), by task:
  causal_lm: at every position where `kl_mask` (default: attention_mask) is 1; each position's
             next-token distribution.
  seq2seq:   at each answer token (labels != -100), given its prefix; `kl_mask` overrides.
  binary:    closed-form Bernoulli KL, mean over examples.

Algorithm 1's outer loss of an edited model, L = c_edit * L_e(equiv) + c_loc * L_loc(loc), is
`post_edit_loss`, with its weights in an `Objective`.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mend_jax.models import EditableModel

IGNORE = -100
KL_POSITIONS = ("answer", "all")


def _align(task: str, logits: jax.Array, batch: Mapping[str, jax.Array]):
  """(logits [B,N,V], labels [B,N]) with labels[:, n] the token logits[:, n] predicts (-100: none).

  With batch["read_pos"] the logits are the model's outputs at those positions only (see
  `EditableModel.logits`); padding slots of read_pos (read_mask 0) get label -100."""
  labels = batch["labels"]
  if "read_pos" in batch:
    pos = batch["read_pos"].astype(jnp.int32)
    if task == "causal_lm":
      pos = pos + 1
    pos = jnp.clip(pos, 0, labels.shape[1] - 1)
    picked = jnp.take_along_axis(labels, pos, axis=1)
    return logits, jnp.where(batch["read_mask"] != 0, picked, IGNORE)
  if task == "causal_lm":
    return logits[:, :-1], labels[:, 1:]
  return logits, labels


def token_logprobs(task: str, logits: jax.Array, batch: Mapping[str, jax.Array]):
  """Log-probability of each scored label and its mask.

  Returns (logp, mask): [B,T'] each for sequence tasks, [B] for binary.
  """
  labels = batch["labels"]
  if task == "binary":
    y = labels.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    logp = y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits)
    return logp, jnp.ones_like(logp)
  logits, labels = _align(task, logits, batch)
  mask = labels != IGNORE
  logp = label_logprob(logits.astype(jnp.float32), jnp.where(mask, labels, 0).astype(jnp.int32))
  return jnp.where(mask, logp, 0.0), mask.astype(jnp.float32)


# The vocabulary passes. Over a 50257-word vocabulary each pass over the logits reads
# [tokens, 50257] floats, and XLA's CPU backend evaluates exp at about 1.6 ns per element, on one
# thread inside a reduction. The two functions below (token log-probabilities and the locality
# KL) compute each exp once, as an elementwise array that XLA spreads over the threads, and keep
# it for the backward pass; autodiff of log_softmax would evaluate it two or three times.


def _shifted_exp(z: jax.Array):
  """(e, s, m): e = exp(z - m) with m the row maximum, s = sum(e) (both [..., 1]), so that
  softmax(z) = e / s and logsumexp(z) = m + log(s)."""
  m = jax.lax.stop_gradient(jnp.max(z, -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows of all -inf (or +inf) keep log_softmax's NaN/-inf
  e = jnp.exp(z - m)
  return e, jnp.sum(e, -1, keepdims=True), m


@jax.custom_vjp
def label_logprob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log_softmax(logits)[..., label] for logits [..., V] and int labels [...] (in [0, V)).

  Equal to `jax.nn.log_softmax` followed by `take_along_axis`; its gradient,
  g * (onehot(label) - softmax), reuses the forward pass's exp (see the note above)."""
  return _lp_fwd(logits, labels)[0]


def _lp_fwd(logits, labels):
  e, s, m = _shifted_exp(logits)
  own = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  return (own - m - jnp.log(s))[..., 0], (e, s, labels)


def _lp_bwd(res, g):
  e, s, labels = res
  onehot = jax.lax.broadcasted_iota(jnp.int32, e.shape, e.ndim - 1) == labels[..., None]
  d = g[..., None] * (onehot.astype(e.dtype) - e / s)
  return d, np.zeros(labels.shape, jax.dtypes.float0)


label_logprob.defvjp(_lp_fwd, _lp_bwd)


def nll(task: str, logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Token-mean negative log-likelihood over all scored tokens of the batch (scalar)."""
  logp, mask = token_logprobs(task, logits, batch)
  return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def nll_per_edit_sum(task: str, logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Sum over the examples of each one's token-mean NLL (scalar): the loss an edit differentiates.

  Its gradient is the sum of each edit's own token-mean gradient, so the scale of one edit's
  delta does not depend on how many edits share the batch (a batch token mean would shrink it by
  1/k and put k-edit batches outside the normalisation statistics learned with single edits).
  Equal to `nll` for a batch of one."""
  logp, mask = token_logprobs(task, logits, batch)
  if logp.ndim == 1:  # binary: one prediction per example
    return -jnp.sum(logp * mask)
  return -jnp.sum(jnp.sum(logp * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))


def exact_match(task: str, logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Per-example success [B] (float 0/1): every scored label token is the argmax (teacher forced);
  binary: sigmoid(logit) > 0.5 agrees with the label. Examples with no scored token count as 0."""
  labels = batch["labels"]
  if task == "binary":
    return ((logits > 0).astype(jnp.int32) == labels.astype(jnp.int32)).astype(jnp.float32)
  logits, labels = _align(task, logits, batch)
  mask = labels != IGNORE
  correct = is_argmax(logits, jnp.where(mask, labels, 0)) | ~mask
  return (jnp.all(correct, -1) & jnp.any(mask, -1)).astype(jnp.float32)


def is_argmax(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1) == labels`, NaNs and ties included (argmax takes the first NaN, else
  the first maximum), as one comparison-and-reduce pass over the vocabulary: XLA's CPU argmax is
  a two-operand reduction several times slower, and the training step's metrics take three
  (`post_edit_loss`)."""
  labels = labels.astype(jnp.int32)
  own = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  nan = jnp.isnan(logits)
  before = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) < labels[..., None]
  beaten = (logits > own) | (nan & ~jnp.isnan(own)) | (((logits == own) | nan) & before)
  return ~jnp.any(beaten, -1)


def prediction_agreement(task: str, logits_a: jax.Array, logits_b: jax.Array,
                         batch: Mapping[str, jax.Array]) -> jax.Array:
  """Per example [B]: the share of its scored positions whose predicted token (argmax, teacher
  forced) is the same under both logits (binary: the same side of 0). EasyEdit's locality: 1.0
  when an edit leaves the example's predictions alone. Examples with no scored token count 1."""
  if task == "binary":
    return ((logits_a > 0) == (logits_b > 0)).astype(jnp.float32)
  la, labels = _align(task, logits_a, batch)
  lb, _ = _align(task, logits_b, batch)
  mask = (labels != IGNORE).astype(jnp.float32)
  same = (jnp.argmax(la, -1) == jnp.argmax(lb, -1)).astype(jnp.float32)
  return jnp.where(jnp.sum(mask, -1) > 0, jnp.sum(same * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0), 1.0)


def changed_to_targets(task: str, logits_a: jax.Array, logits_b: jax.Array, batch: Mapping[str, jax.Array],
                       targets: jax.Array) -> jax.Array:
  """Per example [B]: the share of its scored positions whose predicted token (argmax, teacher
  forced) differs between the two logits and is, under logits_b, one of the tokens in `targets`
  (any shape; IGNORE entries ignored). With the locality batch and the new targets' labels of the
  edits applied between a and b: how much of the lost locality is the edits' new answers leaking
  into other prompts (at most 1 - `prediction_agreement`). Examples with no scored token count 0."""
  la, labels = _align(task, logits_a, batch)
  lb, _ = _align(task, logits_b, batch)
  mask = (labels != IGNORE).astype(jnp.float32)
  pa, pb = jnp.argmax(la, -1), jnp.argmax(lb, -1)
  t = targets.reshape(-1)
  is_target = jnp.any((pb[..., None] == t) & (t != IGNORE), -1)
  hit = ((pa != pb) & is_target).astype(jnp.float32)
  return jnp.sum(hit * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def kl_mask(task: str, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Which positions the locality KL reads (see module docstring); [B,T], or [B,P] at read_pos."""
  if "kl_mask" in batch:
    m = batch["kl_mask"]
  elif task == "seq2seq":
    m = batch["labels"] != IGNORE
  else:
    m = batch["attention_mask"]
  m = m.astype(jnp.float32)
  if "read_pos" in batch:
    m = jnp.take_along_axis(m, batch["read_pos"].astype(jnp.int32), axis=1) * (batch["read_mask"] != 0)
  return m


def locality_kl(task: str, base_logits: jax.Array, edited_logits: jax.Array,
                batch: Mapping[str, jax.Array]) -> jax.Array:
  """KL(p_base || p_edited) averaged over the locality positions (scalar); the base logits are a
  fixed reference (no gradient flows into them)."""
  if task == "binary":
    p, q = base_logits.astype(jnp.float32), edited_logits.astype(jnp.float32)
    kl = (jax.nn.sigmoid(p) * (jax.nn.log_sigmoid(p) - jax.nn.log_sigmoid(q))
          + jax.nn.sigmoid(-p) * (jax.nn.log_sigmoid(-p) - jax.nn.log_sigmoid(-q)))
    return jnp.mean(kl)
  mask = kl_mask(task, batch)
  kl = categorical_kl(jax.lax.stop_gradient(base_logits.astype(jnp.float32)), edited_logits.astype(jnp.float32))
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@jax.custom_vjp
def categorical_kl(base_logits: jax.Array, edited_logits: jax.Array) -> jax.Array:
  """KL(softmax(base) || softmax(edited)) over the last axis, [...]; differentiable in the edited
  logits only (the base's gradient is zero: a frozen reference).

  With p = softmax(base), KL = sum p * (base - edited) - logsumexp(base) + logsumexp(edited).
  The gradient, g * (softmax(edited) - softmax(base)), is written out from the two exps of the
  forward pass (the note above `label_logprob`); autodiff of two log-softmaxes materialises both
  log-probability arrays and evaluates five exps per element."""
  return _kl_fwd(base_logits, edited_logits)[0]


def _kl_fwd(base_logits, edited_logits):
  ep, sp, mp = _shifted_exp(base_logits)
  eq, sq, mq = _shifted_exp(edited_logits)
  cross = jnp.sum(ep * (base_logits - edited_logits), -1, keepdims=True) / sp
  kl = cross - (mp + jnp.log(sp)) + (mq + jnp.log(sq))
  return kl[..., 0], (ep, sp, eq, sq)


def _kl_bwd(res, g):
  ep, sp, eq, sq = res
  d = g[..., None] * (eq / sq - ep / sp)
  return jnp.zeros_like(ep), d


categorical_kl.defvjp(_kl_fwd, _kl_bwd)


# ---------------------------------------------------------------------------- Algorithm 1


class Objective(NamedTuple):
  """The weights of Algorithm 1's loss, the same for every learned editor:
  L = c_edit * L_e(equiv) + c_loc * KL(p_base || p_edited)(loc), the KL at the answer positions
  ("answer": `kl_mask`) or at every non-pad token ("all")."""

  c_edit: float = 0.1
  c_loc: float = 1.0
  kl_positions: str = "answer"


def check_kl_positions(value: str) -> None:
  """Raises ValueError unless `value` is one of KL_POSITIONS."""
  if value not in KL_POSITIONS:
    raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {value!r}")


def loc_batch(batch: Mapping[str, jax.Array], kl_positions: str) -> dict:
  """The locality batch the KL reads: "answer" keeps it as is; "all" drops kl_mask and the read
  positions, so the KL covers every non-pad token (see `kl_mask`)."""
  if kl_positions == "all":
    return {k: v for k, v in batch.items() if k not in ("kl_mask", "read_pos", "read_mask")}
  return dict(batch)


def edit_nll(model: EditableModel, params, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The loss a one-shot edit differentiates: `nll_per_edit_sum` of the model's logits (equal to
  the token mean for one edit), so each of k edits gets the step it would get alone."""
  return nll_per_edit_sum(model.task, model.logits(params, batch), batch)


def post_edit_loss(model: EditableModel, edited_params, ref_params, batch: Mapping[str, Mapping[str, jax.Array]],
                   objective: Objective, ref_logits: jax.Array | None = None):
  """The outer loss of Algorithm 1 for an edited model: c_edit * L_e + c_loc * L_loc.

  Args:
    edited_params: the model after the edit (differentiated).
    ref_params: the reference model of the locality KL, under stop_gradient (ignored when
      `ref_logits` is given: the reference's logits on `loc_batch(batch["loc"], kl_positions)`).
    batch: {"equiv", "loc"} batches (and "edit", unused here).
  Returns:
    (loss [], metrics): loss, loss_edit (token-mean NLL of "equiv"), loss_loc (the KL),
    edit_success (mean exact match on "equiv"), loc_agree (share of locality examples whose
    exact match is unchanged).
  """
  check_kl_positions(objective.kl_positions)
  task = model.task
  eq_logits = model.logits(edited_params, batch["equiv"])
  l_edit = nll(task, eq_logits, batch["equiv"])
  loc = loc_batch(batch["loc"], objective.kl_positions)
  if ref_logits is None:
    ref_logits = model.logits(ref_params, loc)
  ref_logits = jax.lax.stop_gradient(ref_logits)
  post_logits = model.logits(edited_params, loc)
  l_loc = locality_kl(task, ref_logits, post_logits, loc)
  loss = objective.c_edit * l_edit + objective.c_loc * l_loc
  metrics = {
      "loss": loss, "loss_edit": l_edit, "loss_loc": l_loc,
      "edit_success": jnp.mean(exact_match(task, eq_logits, batch["equiv"])),
      # `loc`, the batch the logits were computed on (with kl_positions="all" it has no read_pos).
      "loc_agree": jnp.mean(exact_match(task, post_logits, loc) == exact_match(task, ref_logits, loc)),
  }
  return loss, metrics
