"""KE, KnowledgeEditor (De Cao et al. 2021; official port: algs/efk.py): a learned editor that reads
the edit text and rescales the fine-tuning gradient.

Per edit b of the batch, a BiLSTM reads the edit text and gives a condition vector
  h_b = tanh(Dense_cond([h_fwd, h_bwd]))                            [cond_dim]
(final hidden states of a forward and a backward LSTM, as allennlp's Seq2Vec wrapper). For each
editable matrix l its own conditioner, WNDense(cond_hidden) -> tanh -> WNDense(2 (d_in + d_out) + 1)
(WN = weight normalisation, as the official), maps h_b to (r, c, p, q, g): r, p [d_out], c, q [d_in],
g a scalar. In [d_out, d_in] orientation (transposed for [in, out] kernels):
  mask m_b = softmax(r) c^T,   offset o_b = softmax(p) q^T,   gate s_b = max_scale * sigmoid(g),
  W_l' = W_l - sum_b s_b (G_lb * m_b + o_b),
G_lb = the fine-tuning gradient of edit b's own token-mean NLL (as MEND's edit loss; for one edit
exactly the official grad_W L_e). Since G_lb = sum_t delta_bt u_bt^T (capture), G_lb * (a c^T) =
sum_t (a * delta_bt)(c * u_bt)^T: the update is a rank-1 sum, no per-example gradient is formed.
The official code handles one edit per batch only; summing per-example updates is this port's
extension to k edits (identical for k = 1). The official adds the update (W + ...); this port
subtracts it, so a positive mask is a descent step as in the design.

Edit text. The official reads the string "prediction >> new target || input". Batches here carry
tokens, not strings, so the LSTM reads the edit's own tokens with a learned segment embedding
(0: input, 1: target) added: causal_lm: input_ids (the target is inside; target = labels != -100);
seq2seq: input_ids then the scored decoder labels; binary: input_ids then one extra position holding
a learned embedding of the target label. Padding is dropped (valid tokens are packed to the front).
Token embeddings are initialised from the base model's input embedding table (as the official;
embed_init="random" for a fresh table) and trained with the rest.

Sizes (official OneShotLearner with EFK's arguments): embedding width = the model's; LSTM hidden
512 per direction; condition 768; conditioner hidden 512; max_scale 1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mend_jax import capture as capture_lib
from mend_jax import losses, tree
from mend_jax.editors.base import Editor, EditorState
from mend_jax.models import EditableModel

_EMBED_NAMES = ("wte", "shared", "word_embeddings", "embed_tokens")


@dataclasses.dataclass(frozen=True)
class KEConfig:
  """embed_init: "model" (copy the base model's token embeddings, official) or "random".
  embed_dim: embedding width (None: the model's; must be None with embed_init="model").
  lstm_hidden / cond_dim / cond_hidden: official 512 / 768 / 512. max_scale: gate ceiling
  (official 1). The training loss's weights come from the `losses.Objective`."""

  embed_init: str = "model"
  embed_dim: int | None = None
  lstm_hidden: int = 512
  cond_dim: int = 768
  cond_hidden: int = 512
  max_scale: float = 1.0

  def __post_init__(self):
    if self.embed_init not in ("model", "random"):
      raise ValueError(f"KE embed_init must be 'model' or 'random', got {self.embed_init!r}")
    if self.embed_init == "model" and self.embed_dim is not None:
      raise ValueError("KE embed_dim must be None with embed_init='model' (the width is the model's)")
    for k in ("lstm_hidden", "cond_dim", "cond_hidden"):
      if getattr(self, k) < 1:
        raise ValueError(f"KE {k} must be >= 1, got {getattr(self, k)}")


def find_embedding(model: EditableModel, params) -> str:
  """Path of the model's input token-embedding table ([vocab, width])."""
  vocab = model.config.vocab_size
  flat = tree.flatten(params)
  cands = [p for p, v in flat.items() if p.endswith("/embedding") and v.ndim == 2 and v.shape[0] == vocab]
  named = [p for p in cands if any(n in p.split("/") for n in _EMBED_NAMES)]
  if not (named or cands):
    raise ValueError(f"no [vocab={vocab}, width] '.../embedding' table in the model's parameters; "
                     "use KEConfig(embed_init='random', embed_dim=...)")
  return (named or cands)[0]


# Initialisation: PyTorch's defaults, as the official modules get them. Linear weights and biases
# U(+-1/sqrt(fan_in)); every LSTM weight and bias U(+-1/sqrt(hidden)); weight norm's scale g starts
# at the norm of each output unit's weights (so the initial weight is v itself); the token table
# N(0, 1) unless copied from the model; segment and label embeddings N(0, 0.02). `init_params`
# draws them on the host with numpy: compiling flax's init (two LSTM scans, many random draws)
# takes seconds per editor on CPU. The modules' own initialisers give the same distributions.
def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class WNDense(nn.Module):
  """A weight-normalised linear layer: y = x (v * g / ||v||_col) + b, v: [in, out], g, b: [out]."""

  features: int

  @nn.compact
  def __call__(self, x):
    bound = 1.0 / x.shape[-1] ** 0.5
    v = self.param("kernel", _uniform(bound), (x.shape[-1], self.features))
    g = self.param("scale", lambda _: jnp.linalg.norm(v, axis=0))
    b = self.param("bias", _uniform(bound), (self.features,))
    return x @ (v * (g / jnp.linalg.norm(v, axis=0))) + b


class Conditioner(nn.Module):
  """Condition vector [B, cond_dim] -> (r, c, p, q, gate) for one [d_in, d_out] matrix."""

  d_in: int
  d_out: int
  hidden: int
  max_scale: float

  @nn.compact
  def __call__(self, cond):
    d_in, d_out = self.d_in, self.d_out
    o = WNDense(2 * (d_in + d_out) + 1, name="out")(jnp.tanh(WNDense(self.hidden, name="hidden")(cond)))
    r, c, p, q, g = jnp.split(o, [d_out, d_out + d_in, 2 * d_out + d_in, 2 * (d_out + d_in)], axis=-1)
    return jax.nn.softmax(r, -1), c, jax.nn.softmax(p, -1), q, self.max_scale * jax.nn.sigmoid(g[:, 0])


class KENet(nn.Module):
  """Edit text -> per-layer (r, c, p, q, gate). shapes: (d_in, d_out) per editable layer.

  Parameters: embed, segment, label (binary only), lstm_fwd/cell, lstm_bwd/cell, cond, layer{i}."""

  vocab_size: int
  embed_dim: int
  lstm_hidden: int
  cond_dim: int
  cond_hidden: int
  shapes: tuple[tuple[int, int], ...]
  max_scale: float

  @nn.compact
  def __call__(self, ids, segment, valid, label=None):
    """ids, segment: [B,S] int; valid: [B,S] bool; label: [B] int in {0,1} or None.
    Returns a list (one per layer) of (r [B,d_out] softmaxed, c [B,d_in], p [B,d_out] softmaxed,
    q [B,d_in], gate [B])."""
    small = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.initializers.normal(1.0), name="embed")(ids)
    x = x + nn.Embed(2, self.embed_dim, embedding_init=small, name="segment")(segment)
    if label is not None:
      lab = nn.Embed(2, self.embed_dim, embedding_init=small, name="label")(label)
      x = jnp.concatenate([x, lab[:, None]], 1)
      valid = jnp.concatenate([valid, jnp.ones_like(valid[:, :1])], 1)
    # Pack the valid tokens to the front (stable), so seq_lengths describes them for both directions.
    order = jnp.argsort(jnp.where(valid, 0, 1), axis=1, stable=True)
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    init = _uniform(1.0 / self.lstm_hidden ** 0.5)
    # parent=None: the RNN adopts the cell, so its parameters live under lstm_*/cell.
    cell = lambda: nn.OptimizedLSTMCell(self.lstm_hidden, kernel_init=init, recurrent_kernel_init=init,
                                        bias_init=init, parent=None)
    (_, h_f), _ = nn.RNN(cell(), return_carry=True, name="lstm_fwd")(x, seq_lengths=lengths)
    (_, h_b), _ = nn.RNN(cell(), return_carry=True, reverse=True, keep_order=True, name="lstm_bwd")(
        x, seq_lengths=lengths)
    h = jnp.concatenate([h_f, h_b], -1)
    bound = 1.0 / h.shape[-1] ** 0.5
    cond = jnp.tanh(nn.Dense(self.cond_dim, kernel_init=_uniform(bound), bias_init=_uniform(bound), name="cond")(h))
    return [Conditioner(d_in, d_out, self.cond_hidden, self.max_scale, name=f"layer{i}")(cond)
            for i, (d_in, d_out) in enumerate(self.shapes)]


def init_params(shapes, seed: int, lstm_hidden: int) -> dict:
  """KENet parameters for the abstract tree `shapes` (from jax.eval_shape of its init), drawn on
  the host with the distributions above."""
  rng = np.random.default_rng(seed)
  flat = {tuple(k.split("/")): v for k, v in tree.flatten(shapes).items()}
  out = {}
  for path in sorted(flat, key=lambda p: (p[:-1], p[-1] == "scale")):  # each kernel before its scale
    shape, name = flat[path].shape, path[-1]
    if name == "embedding":
      x = rng.normal(0.0, 1.0 if path[0] == "embed" else 0.02, shape)
    elif path[0].startswith("lstm_"):
      x = rng.uniform(-1, 1, shape) / lstm_hidden ** 0.5
    elif name == "scale":
      x = np.linalg.norm(out[(*path[:-1], "kernel")], axis=0)
    else:  # Dense / WNDense kernel [in, out] or bias [out]
      fan_in = flat[(*path[:-1], "kernel")].shape[0]
      x = rng.uniform(-1, 1, shape) / fan_in ** 0.5
    out[path] = np.asarray(x, np.float32)
  return tree.unflatten({"/".join(k): jnp.asarray(v) for k, v in out.items()})


def edit_text(task: str, batch: Mapping[str, jax.Array]):
  """The tokens the LSTM reads (module docstring): (ids, segment, valid, label or None)."""
  mask = batch["attention_mask"] > 0
  ids = batch["input_ids"]
  if task == "causal_lm":
    return ids, (batch["labels"] != -100).astype(jnp.int32), mask, None
  if task == "seq2seq":
    tgt = batch["labels"] != -100
    return (jnp.concatenate([ids, jnp.where(tgt, batch["labels"], 0).astype(ids.dtype)], 1),
            jnp.concatenate([jnp.zeros_like(ids), tgt.astype(ids.dtype)], 1),
            jnp.concatenate([mask, tgt], 1), None)
  return ids, jnp.zeros_like(ids), mask, batch["labels"].astype(jnp.int32)


class KE(Editor):
  """Usage:
    ke = KE(model, KEConfig())
    state = ke.init(rng, base_params)          # params {"net": KENet params}
    new_params, info = ke.jit_edit(state, base_params, edit_batch)
  Its training loss is the interface's default (`Editor.loss`).
  """

  name = "ke"
  config_class = KEConfig
  learned = True

  def __init__(self, model: EditableModel, cfg: KEConfig = KEConfig()):
    super().__init__(model, cfg)

  def _net(self, embed_dim: int) -> KENet:
    return KENet(self.model.config.vocab_size, embed_dim, self.cfg.lstm_hidden, self.cfg.cond_dim,
                 self.cfg.cond_hidden, tuple((l.d_in, l.d_out) for l in self.model.layers), self.cfg.max_scale)

  @functools.cached_property
  def _embed_dim(self) -> int:
    if self.cfg.embed_dim is not None:
      return self.cfg.embed_dim
    params = self.model.params if self.model.params is not None else self.model.hf_model.params
    return int(tree.get_leaves(params, [find_embedding(self.model, params)]).popitem()[1].shape[1])

  def init(self, rng: jax.Array, base_params) -> EditorState:
    """params {"net": KENet parameters (torch's default initialisation, drawn on the host; the
    token table copied from the model with embed_init="model")}; aux {}."""
    net = self._net(self._embed_dim)
    ids = jnp.ones((1, 2), jnp.int32)
    label = jnp.zeros((1,), jnp.int32) if self.model.task == "binary" else None
    args = (ids, jnp.zeros_like(ids), jnp.ones((1, 2), bool), label)
    if isinstance(rng, jax.core.Tracer):  # under jit / eval_shape: flax's own (same) initialisers
      params = net.init(rng, *args)["params"]
    else:
      shapes = jax.eval_shape(net.init, rng, *args)["params"]
      seed = np.asarray(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)
      params = init_params(shapes, [int(v) for v in seed.ravel()], self.cfg.lstm_hidden)
    if self.cfg.embed_init == "model":
      path = find_embedding(self.model, base_params)
      table = tree.get_leaves(base_params, [path])[path]
      params = {**params, "embed": {"embedding": jnp.array(table, jnp.float32)}}
    return EditorState({"net": params}, {})

  def factors(self, net_params, batch: Mapping[str, jax.Array]):
    """The network's per-layer (r, c, p, q, gate) for an edit batch (see KENet)."""
    ids, seg, valid, label = edit_text(self.model.task, batch)
    return self._net(self._embed_dim).apply({"params": net_params}, ids, seg, valid, label)

  def _edit(self, state: EditorState, params, batch: Mapping[str, jax.Array]):
    """W' = W - sum_b s_b (G_b * m_b + o_b) on each editable matrix. Returns (new_params, info),
    info = {loss_before: [], update_norm: [n_layers], gate: [n_layers, B]}. Pure and jittable."""
    task = self.model.task
    cap = capture_lib.capture(self.model, params, batch,
                              loss_fn=lambda logits, b: losses.nll_per_edit_sum(task, logits, b))
    facs = self.factors(state.params["net"], batch)
    kernels = tree.get_leaves(params, self.model.layer_paths)
    new, norms = {}, []
    for layer, (r, c, p, q, s) in zip(self.model.layers, facs):
      u = cap.u[layer.path].astype(jnp.float32) * c[:, None, :]
      d = cap.delta[layer.path].astype(jnp.float32) * (s[:, None] * r)[:, None, :]
      step = capture_lib.rank1_sum(u, d, layer.layout) + capture_lib.rank1_sum(q, s[:, None] * p, layer.layout)
      w = kernels[layer.path]
      new[layer.path] = (w.astype(jnp.float32) - step).astype(w.dtype)  # in float32, stored in w's dtype
      norms.append(jnp.linalg.norm(step))
    info = {"loss_before": cap.loss, "update_norm": jnp.stack(norms), "gate": jnp.stack([f[4] for f in facs])}
    return tree.replace_leaves(params, new), info
