"""Model-family adapters for Hugging Face Flax models (transformers 4.x).

An adapter (`Family`) says, for one family of models: which Flax class to build, which task loss
applies, which MLP matrices the paper edits by default, and how the kernel is laid out. `load_model`
and `model_from_config` return an `EditableModel`: the Hugging Face model object (module + config),
its parameters, and the resolved list of editable layers. Parameters always travel separately from
the model object, so every function over them is pure and jittable.

Batches are dicts of arrays (see `mend_jax.losses` for the loss conventions):
  causal_lm: input_ids [B,T] int, attention_mask [B,T], labels [B,T] int (-100 = not scored;
             labels[:, t] is the token at position t, predicted from position t-1).
  seq2seq:   input_ids [B,S], attention_mask [B,S], decoder_input_ids [B,T],
             decoder_attention_mask [B,T], labels [B,T] (-100 = not scored; aligned with the
             decoder positions, no shift).
  binary:    input_ids [B,S], attention_mask [B,S], labels [B] in {0, 1}.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from mend_jax import compat, gguf_models, tree

compat.patch_transformers_flax()

Params = Mapping[str, Any]
TASKS = ("causal_lm", "seq2seq", "binary")


def _last(n: int, k: int) -> str:
  """Regex alternation for the indices of the last k of n blocks."""
  if n < 1:
    raise ValueError(f"model has {n} blocks; need at least 1 to edit")
  return "(" + "|".join(str(i) for i in range(max(0, n - k), n)) + ")"


@dataclasses.dataclass(frozen=True)
class Family:
  """What the project needs to know about one model family."""

  name: str
  model_types: tuple[str, ...]  # Hugging Face config.model_type values
  flax_class: str  # name of the transformers Flax class
  task: str  # one of TASKS
  default_editable: Callable[[Any], tuple[str, ...]]  # hf config -> regexes over param paths
  # GPT-2's FlaxConv1D stores its kernel as [out, in]; nn.Dense stores [in, out].
  kernel_layout: str = "in_out"
  # Decoder-only models get explicit position ids (cumsum of the mask) so left padding is safe.
  needs_position_ids: bool = False
  # Regex over parameter paths of the layers between which and the vocabulary projection every
  # step is per position (the MLP of the last block of the stack that feeds lm_head): their
  # delta is exactly zero except where logits are read, so MEND keeps only those rows.
  head_local: Callable[[Any], str] | None = None


def _gpt2_editable(c) -> tuple[str, ...]:
  return (rf"^transformer/h/{_last(c.n_layer, 3)}/mlp/(c_fc|c_proj)/kernel$",)


def _gpt_neo_editable(c) -> tuple[str, ...]:
  return (rf"^transformer/h/{_last(c.num_layers, 3)}/mlp/(c_fc|c_proj)/kernel$",)


def _gptj_editable(c) -> tuple[str, ...]:
  return (rf"^transformer/h/{_last(c.n_layer, 3)}/mlp/(fc_in|fc_out)/kernel$",)


def _t5_editable(c) -> tuple[str, ...]:
  n_dec = c.num_decoder_layers or c.num_layers
  # As in the paper: the input and output MLP matrices (wi or gated wi_0, and wo) of the last two
  # encoder and last two decoder blocks; the FF sub-layer is layer/1 (encoder) and layer/2 (decoder).
  return (
      rf"^encoder/block/{_last(c.num_layers, 2)}/layer/1/DenseReluDense/(wi|wi_0|wo)/kernel$",
      rf"^decoder/block/{_last(n_dec, 2)}/layer/2/DenseReluDense/(wi|wi_0|wo)/kernel$",
  )


def _bart_editable(c) -> tuple[str, ...]:
  return (
      rf"^model/encoder/layers/{_last(c.encoder_layers, 2)}/(fc1|fc2)/kernel$",
      rf"^model/decoder/layers/{_last(c.decoder_layers, 2)}/(fc1|fc2)/kernel$",
  )


def _bert_editable(c) -> tuple[str, ...]:
  # layer/N/output/dense (the MLP output), not layer/N/attention/output/dense.
  return (rf"^bert/encoder/layer/{_last(c.num_hidden_layers, 3)}/(intermediate|output)/dense/kernel$",)


def _llama_editable(c) -> tuple[str, ...]:
  return (rf"^model/layers/{_last(c.num_hidden_layers, 3)}/mlp/(gate_proj|up_proj|down_proj)/kernel$",)


def _head_local(fmt: str, n_attr: str) -> Callable[[Any], str]:
  return lambda c: fmt.format(getattr(c, n_attr) - 1)


_LLAMA_HEAD = _head_local(r"^model/layers/{}/mlp/", "num_hidden_layers")
_T5_HEAD = lambda c: rf"^decoder/block/{(c.num_decoder_layers or c.num_layers) - 1}/layer/2/"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt2", ("gpt2",), "FlaxGPT2LMHeadModel", "causal_lm", _gpt2_editable, "out_in", True,
               _head_local(r"^transformer/h/{}/mlp/", "n_layer")),
        Family("gpt_neo", ("gpt_neo",), "FlaxGPTNeoForCausalLM", "causal_lm", _gpt_neo_editable,
               needs_position_ids=True, head_local=_head_local(r"^transformer/h/{}/mlp/", "num_layers")),
        Family("gptj", ("gptj",), "FlaxGPTJForCausalLM", "causal_lm", _gptj_editable,
               needs_position_ids=True, head_local=_head_local(r"^transformer/h/{}/mlp/", "n_layer")),
        Family("t5", ("t5",), "FlaxT5ForConditionalGeneration", "seq2seq", _t5_editable, head_local=_T5_HEAD),
        Family("bart", ("bart",), "FlaxBartForConditionalGeneration", "seq2seq", _bart_editable,
               head_local=_head_local(r"^model/decoder/layers/{}/fc[12]/", "decoder_layers")),
        Family("bert", ("bert",), "FlaxBertForSequenceClassification", "binary", _bert_editable),
        Family("llama", ("llama",), "FlaxLlamaForCausalLM", "causal_lm", _llama_editable,
               needs_position_ids=True, head_local=_LLAMA_HEAD),
        Family("mistral", ("mistral",), "FlaxMistralForCausalLM", "causal_lm", _llama_editable,
               needs_position_ids=True, head_local=_LLAMA_HEAD),
        Family("gemma", ("gemma",), "FlaxGemmaForCausalLM", "causal_lm", _llama_editable,
               needs_position_ids=True, head_local=_LLAMA_HEAD),
    )
}


def family_for_config(hf_config) -> Family:
  """The Family whose model_types include hf_config.model_type (ValueError naming the supported ones)."""
  model_type = getattr(hf_config, "model_type", None)
  for fam in FAMILIES.values():
    if model_type in fam.model_types:
      return fam
  raise ValueError(
      f"model_type {model_type!r} is not supported; expected one of "
      f"{sorted(t for f in FAMILIES.values() for t in f.model_types)}")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One editable weight matrix.

  path: "/"-joined parameter path of the kernel, e.g. "transformer/h/5/mlp/c_fc/kernel".
  module_path: the Flax module path whose __call__ computes z = W u + b (path minus "/kernel").
  d_in, d_out: the layer's input and output widths (orientation-free).
  layout: "in_out" (kernel [d_in, d_out]) or "out_in" (kernel [d_out, d_in]).
  """

  path: str
  module_path: str
  d_in: int
  d_out: int
  layout: str

  @property
  def shape_key(self) -> str:
    """Layers with equal (d_in, d_out) share one editor network (the paper's parameter sharing)."""
    return f"{self.d_in}x{self.d_out}"


def _natural_key(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def resolve_layers(params: Params, regexes: Sequence[str], layout: str) -> tuple[Layer, ...]:
  """Editable layers whose "/"-joined parameter path matches any regex, in natural order."""
  if isinstance(regexes, str):
    regexes = (regexes,)
  compiled = []
  for rx in regexes:
    try:
      compiled.append(re.compile(rx))
    except re.error as e:
      raise ValueError(f"editable regex {rx!r} is not a valid regular expression: {e}") from None
  flat = tree.flatten(params)
  # Order: by the first regex that matches (e.g. encoder before decoder), then natural path order.
  matched = {}
  for path in flat:
    hits = [i for i, rx in enumerate(compiled) if rx.search(path)]
    if hits:
      matched[path] = hits[0]
  layers = []
  for path in sorted(matched, key=lambda p: (matched[p], _natural_key(p))):
    kernel = flat[path]
    if not path.endswith("/kernel") or getattr(kernel, "ndim", 0) != 2:
      raise ValueError(
          f"editable regexes {list(regexes)} matched {path!r} with shape {getattr(kernel, 'shape', None)}; "
          "only 2-D '.../kernel' matrices of linear layers can be edited")
    a, b = kernel.shape
    d_in, d_out = (a, b) if layout == "in_out" else (b, a)
    layers.append(Layer(path, path[: -len("/kernel")], int(d_in), int(d_out), layout))
  if not layers:
    sample = [p for p in flat if p.endswith("kernel")][:8]
    raise ValueError(f"editable regexes {list(regexes)} matched no parameter; kernel paths look like {sample}")
  return tuple(layers)


@dataclasses.dataclass(frozen=True, eq=False)
class EditableModel:
  """A Hugging Face Flax model plus the layers MEND edits. Hashed by identity (a static jit arg).

  `params` is the model's own parameter tree (a convenience: every function takes params
  explicitly, so edited copies never alias it).
  """

  hf_model: Any
  family: Family
  layers: tuple[Layer, ...]
  params: Any = None
  source: str | None = None  # the local directory it was loaded from, if any (its tokenizer is there)

  @property
  def config(self):
    """The Hugging Face config."""
    return self.hf_model.config

  @property
  def task(self) -> str:
    """The loss convention of the family: "causal_lm", "seq2seq" or "binary"."""
    return self.family.task

  @property
  def max_length(self) -> int | None:
    """The longest input the model takes (its position table), or None (T5: relative positions)."""
    c = self.config
    for name in ("n_positions", "max_position_embeddings"):
      if getattr(c, name, None):
        return int(getattr(c, name))
    return None  # T5: relative positions, no hard limit

  @property
  def layer_paths(self) -> tuple[str, ...]:
    """The "/"-joined parameter paths of the editable kernels, in order."""
    return tuple(l.path for l in self.layers)

  @property
  def head_local_paths(self) -> frozenset[str]:
    """Editable layers whose delta is non-zero only at positions whose logits are read."""
    if self.family.head_local is None or self.task == "binary":
      return frozenset()
    rx = re.compile(self.family.head_local(self.config))
    return frozenset(l.path for l in self.layers if rx.search(l.path))

  @property
  def cache_block(self) -> str | None:
    """The module path of the lowest block that holds an editable layer (e.g. "transformer/h/3"),
    whose input hidden state is a constant of each input as long as only the editable layers
    change: `block_input` computes it, and `logits` starts from it when a batch carries it as
    "hidden". Seq2seq models: in the encoder only (the decoder reads the encoder's output, which
    edited encoder layers change). None where no block holds an editable layer."""
    blocks = []
    for layer in self.layers:
      parts = layer.path.split("/")
      idx = next((i for i, q in enumerate(parts) if q.isdigit()), None)
      if idx is None:
        continue
      stack = "/".join(parts[:idx])
      if self.task == "seq2seq" and "encoder" not in stack:
        continue
      blocks.append((stack, int(parts[idx])))
    if not blocks:
      return None
    stack = blocks[0][0]  # the first stack of the model's layer order (an encoder before a decoder)
    return f"{stack}/{min(i for st, i in blocks if st == stack)}"

  def block_input(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The hidden state entering `cache_block`: [B, T, D] (encoder positions for seq2seq), in the
    model's dtype. Under jit only the blocks below it are computed (the rest is dead code)."""
    block = self.cache_block
    if block is None:
      raise ValueError(f"no block of this {self.family.name} model holds an editable layer "
                       f"{list(self.layer_paths)}; there is no frozen prefix to cache")
    seen = []

    def record(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and "/".join(context.module.path) == block:
        seen.append(args[0] if args else kwargs["hidden_states"])
      return next_fun(*args, **kwargs)

    plain = {k: v for k, v in batch.items() if k != "hidden"}
    with nn.intercept_methods(record):
      self.logits(params, plain)
    if len(seen) != 1:
      raise ValueError(f"expected one call of block {block!r} per forward pass, saw {len(seen)}")
    return seen[0]

  def logits(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Forward pass. Returns [B,T,V] (causal_lm), [B,T_dec,V] (seq2seq) or [B] (binary).

    With batch["read_pos"] ([B,P] int, the positions a loss or metric reads; see
    `mend_jax.data.read_positions`) a sequence model returns [B,P,V]: the vocabulary projection,
    about half a token's forward cost on a small GPT-2, runs only there. The head's input is
    gathered where the model calls its `lm_head`, which every supported family does.

    With batch["hidden"] ([B,T,D], `block_input` of the same inputs under the same frozen
    blocks) the forward starts from it at `cache_block`: under jit the blocks below are never
    computed. The result equals the full forward pass as long as only the editable layers differ
    from the parameters the hidden state was computed with.
    """
    if "hidden" in batch:
      return self._logits_from(params, batch)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], params=params)
    if self.task == "seq2seq":
      kw.update(decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"])
    elif self.family.needs_position_ids:
      kw["position_ids"] = position_ids(batch["attention_mask"])
    if self.task == "binary" or "read_pos" not in batch:
      out = self.hf_model(**kw).logits
    else:
      out = _logits_at(self.hf_model, kw, batch["read_pos"])
    if self.task == "binary":
      if out.shape[-1] != 1:
        raise ValueError(f"binary task expects a classifier with num_labels=1, got logits {out.shape}")
      out = out[..., 0]
    return out

  def with_layers(self, regexes: Sequence[str]) -> "EditableModel":
    """The same model editing another set of layers."""
    params = self.params if self.params is not None else self.hf_model.params
    return dataclasses.replace(self, layers=resolve_layers(params, regexes, self.family.kernel_layout))


  def _logits_from(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    block, hidden, calls = self.cache_block, batch["hidden"], []
    if block is None:
      raise ValueError("batch['hidden'] was given, but no block of this model holds an editable layer")

    def substitute(next_fun, args, kwargs, context):
      if context.method_name != "__call__" or "/".join(context.module.path) != block:
        return next_fun(*args, **kwargs)
      calls.append(1)
      if args:
        return next_fun(hidden.astype(args[0].dtype), *args[1:], **kwargs)
      return next_fun(*args, **{**kwargs, "hidden_states": hidden.astype(kwargs["hidden_states"].dtype)})

    with nn.intercept_methods(substitute):
      out = self.logits(params, {k: v for k, v in batch.items() if k != "hidden"})
    if len(calls) != 1:
      raise ValueError(f"expected one call of block {block!r} per forward pass, saw {len(calls)}")
    return out


def _logits_at(hf_model, kw, read_pos: jax.Array) -> jax.Array:
  """hf_model(**kw).logits at positions read_pos [B,P] only: [B,P,V]."""
  calls = []

  def gather_head_input(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or context.module.name != "lm_head":
      return next_fun(*args, **kwargs)
    calls.append(1)
    h = args[0]  # [B,T,D]
    h = jnp.take_along_axis(h, read_pos[:, :, None].astype(jnp.int32), axis=1)
    return next_fun(h, *args[1:], **kwargs)

  with nn.intercept_methods(gather_head_input):
    out = hf_model(**kw).logits
  if len(calls) != 1:
    raise ValueError(f"{type(hf_model).__name__}: expected one call of its lm_head, saw {len(calls)}; "
                     f"drop batch['read_pos'] to compute logits at every position")
  return out


def position_ids(attention_mask: jax.Array) -> jax.Array:
  """Positions counted over real tokens only, so left padding does not shift them. [B,T] int32."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _flax_class(family: Family):
  return getattr(transformers, family.flax_class)


def _wrap(hf_model, editable: Sequence[str] | None, params=None, source: str | None = None) -> EditableModel:
  family = family_for_config(hf_model.config)
  params = hf_model.params if params is None else params
  regexes = tuple(editable) if editable else family.default_editable(hf_model.config)
  layers = resolve_layers(params, regexes, family.kernel_layout)
  return EditableModel(hf_model, family, layers, params, source)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dtype(params, dtype):
  """params with every floating-point leaf in `dtype` (a jnp dtype or a name in DTYPES)."""
  dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
  return dtype


def model_from_config(hf_config, editable: Sequence[str] | None = None, seed: int = 0,
                      dtype=jnp.float32) -> EditableModel:
  """A randomly initialised model of the family given by `hf_config.model_type`, its parameters
  and computation in `dtype` (float32 or bfloat16; editors keep their own state and the edit's
  arithmetic in float32 and write the edited kernels back in this dtype)."""
  dtype = _dtype(dtype)
  family = family_for_config(hf_config)
  if family.task == "binary" and getattr(hf_config, "num_labels", 1) != 1:
    hf_config.num_labels = 1
  # Initialised under one jit: the eager init of the Flax classes keeps every temporary alive at
  # once (about twice the parameters' memory at peak).
  hf_model = _flax_class(family)(hf_config, seed=seed, dtype=dtype, _do_init=False)
  init = jax.jit(hf_model.init_weights, static_argnums=1)
  params = as_dtype(init(jax.random.PRNGKey(seed), hf_model.input_shape), dtype)
  return _wrap(hf_model, editable, params)


def abstract_model(hf_config, editable: Sequence[str] | None = None, dtype=jnp.float32) -> EditableModel:
  """A model of `hf_config` whose params are jax.ShapeDtypeStructs (no weights are allocated):
  for compiling and planning memory at sizes that do not fit this machine (`jax.jit(...).lower`)."""
  dtype = _dtype(dtype)
  family = family_for_config(hf_config)
  hf_model = _flax_class(family)(hf_config, dtype=dtype, _do_init=False)
  shapes = jax.eval_shape(lambda rng: hf_model.init_weights(rng, hf_model.input_shape), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), shapes)
  return _wrap(hf_model, editable, params)


def load_model(name_or_path: str, editable: Sequence[str] | None = None, dtype=jnp.float32,
               cache: str | None = None, **kwargs) -> EditableModel:
  """Loads pretrained weights: a bundled model by short name (`gguf_models.BUNDLED`, e.g.
  "smollm2-135m"), a llama-family .gguf file (converted once, `gguf_models.resolve`), a local
  Hugging Face directory (Flax msgpack or safetensors) or a hub name.

  dtype: of the parameters and the computation (float32 or bfloat16, see `model_from_config`).
  cache: where a GGUF file is converted to (default `gguf_models.cache_root()`).
  Raises a clear error when the path holds no model or the family is unsupported.
  """
  dtype = _dtype(dtype)
  path = gguf_models.resolve(name_or_path, cache)
  if os.path.sep in path or path.startswith("."):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"model directory {path!r} does not exist")
  try:
    config = transformers.AutoConfig.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"could not load a model config from {path!r}: {e}") from None
  family = family_for_config(config)
  if family.task == "binary":
    kwargs.setdefault("num_labels", 1)
  cls = _flax_class(family)
  # _do_init=False: the weights are read, not first drawn at random (14 s -> 2.5 s for a 135M model).
  try:
    hf_model, params = cls.from_pretrained(path, dtype=dtype, _do_init=False, **kwargs)
  except OSError:
    # Directories saved by PyTorch only hold pytorch_model.bin / model.safetensors in torch layout.
    hf_model, params = cls.from_pretrained(path, dtype=dtype, from_pt=True, _do_init=False, **kwargs)
  rng = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(lambda r: hf_model.init_weights(r, hf_model.input_shape), rng)
  if set(tree.flatten(shapes)) - set(tree.flatten(params)):
    # Weights the checkpoint lacks (e.g. a new classification head) start as the class draws them.
    params = jax.jit(hf_model.init_weights, static_argnums=1)(rng, hf_model.input_shape, params)
  return _wrap(hf_model, editable, as_dtype(params, dtype), source=path if os.path.isdir(path) else None)


def load_tokenizer(name_or_path: str, cache: str | None = None):
  """The tokenizer of what `load_model` loads from the same name or path; GPT-style tokenizers
  without a pad token pad with eos (padding is masked everywhere)."""
  path = gguf_models.resolve(name_or_path, cache)
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"could not load a tokenizer from {path!r}: {e}") from None
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def bos_ids(tokenizer) -> list[int]:
  """[bos] if the tokenizer marks sequences with a bos token (its `add_bos_token` setting, default
  True when it has one), else []."""
  bos = tokenizer.bos_token_id
  if bos is None or not getattr(tokenizer, "init_kwargs", {}).get("add_bos_token", True):
    return []
  return [int(bos)]


# ---------------------------------------------------------------------------- batches

BATCH_KEYS = {"causal_lm": ("input_ids", "attention_mask", "labels"),
              "seq2seq": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"),
              "binary": ("input_ids", "attention_mask", "labels")}


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_batch(model: EditableModel, batch: Mapping[str, Any]) -> None:
  """Clear errors for a malformed edit batch, before anything reaches JAX.

  Checks, naming the key and what was expected: the keys the model's task needs (`BATCH_KEYS`);
  ranks and shapes (input_ids [B, T]; attention_mask like it; labels [B, T] for a causal LM, [B]
  for a classifier; the decoder arrays of a seq2seq model [B, T_dec] with labels like them;
  read_pos/read_mask [B, P]); one batch size B >= 1 for every key; integer dtypes; T within the
  model's context. On concrete (not traced) arrays also the values: token ids inside the
  vocabulary, labels a token id or -100 (classifier: 0 or 1), and at least one scored label per
  edit. Under jit or vmap only the static checks run.
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"an edit batch is a dict of arrays {BATCH_KEYS[model.task]}, got {type(batch).__name__}")
  need = BATCH_KEYS[model.task]
  missing = [k for k in need if k not in batch]
  if missing:
    raise ValueError(f"batch for a {model.task} model is missing {missing}; it has {sorted(batch)}")
  shape = {k: tuple(np.shape(v)) for k, v in batch.items()}
  ids_shape = shape["input_ids"]
  if len(ids_shape) != 2 or ids_shape[0] < 1:
    raise ValueError(f"batch['input_ids'] must be [batch, time] with batch >= 1, got shape {ids_shape}")
  b, t = ids_shape
  dec = shape.get("decoder_input_ids")
  expect = {"input_ids": (b, t), "attention_mask": (b, t)}
  if model.task == "seq2seq":
    if len(dec) != 2 or dec[0] != b:
      raise ValueError(f"batch['decoder_input_ids'] must be [batch={b}, decoder time], got shape {dec}")
    expect.update(decoder_attention_mask=dec, labels=dec)
  else:
    expect["labels"] = (b,) if model.task == "binary" else (b, t)
  if "kl_mask" in batch:
    expect["kl_mask"] = expect["labels"]
  if "read_pos" in batch or "read_mask" in batch:
    p = shape.get("read_pos", shape.get("read_mask"))
    if len(p) != 2 or p[0] != b:
      raise ValueError(f"batch['read_pos'] must be [batch={b}, positions], got shape {p}")
    expect.update(read_pos=p, read_mask=p)
  for k, want in expect.items():
    if shape.get(k) != want:
      raise ValueError(f"batch[{k!r}] has shape {shape.get(k)}; expected {want} (input_ids is {ids_shape}: "
                       "every key needs the same batch size)")
  for k in expect:
    dtype = np.dtype(batch[k].dtype) if hasattr(batch[k], "dtype") else np.asarray(batch[k]).dtype
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
      raise ValueError(f"batch[{k!r}] has dtype {dtype}; expected integers (token ids, masks, labels)")
  if "hidden" in batch:
    h = shape["hidden"]
    if len(h) != 3 or h[:2] != (b, t):
      raise ValueError(f"batch['hidden'] has shape {h}; expected [batch={b}, time={t}, width] (the cached input of "
                       f"block {model.cache_block!r})")
    if not np.issubdtype(np.dtype(batch["hidden"].dtype), np.floating) and batch["hidden"].dtype != jnp.bfloat16:
      raise ValueError(f"batch['hidden'] has dtype {batch['hidden'].dtype}; expected floating point")
  limit = model.max_length
  for k in ("input_ids", "decoder_input_ids"):
    if k in batch and limit is not None and shape[k][1] > limit:
      raise ValueError(f"batch[{k!r}] has {shape[k][1]} tokens, longer than the model's context of {limit}")
  if any(_is_traced(batch[k]) for k in expect):
    return
  vocab = int(model.config.vocab_size)
  for k in ("input_ids", "decoder_input_ids"):
    if k in batch:
      ids = np.asarray(batch[k])
      bad = np.argwhere((ids < 0) | (ids >= vocab))
      if len(bad):
        r, c = (int(x) for x in bad[0])
        raise ValueError(f"batch[{k!r}][{r}, {c}] = {int(ids[r, c])} is not a token id of this model "
                         f"(vocabulary of {vocab})")
  labels = np.asarray(batch["labels"])
  if model.task == "binary":
    bad = np.argwhere((labels != 0) & (labels != 1))
    if len(bad):
      raise ValueError(f"batch['labels'][{int(bad[0][0])}] = {int(labels[bad[0][0]])}; expected 0 or 1")
    return
  bad = np.argwhere(((labels < 0) | (labels >= vocab)) & (labels != -100))
  if len(bad):
    r, c = (int(x) for x in bad[0])
    raise ValueError(f"batch['labels'][{r}, {c}] = {int(labels[r, c])}; expected a token id below {vocab} or -100")
  empty = np.flatnonzero(~np.any(labels != -100, axis=1))
  if len(empty):
    raise ValueError(f"batch['labels'] row {int(empty[0])} has no scored token (all -100): the edit target is empty")


def check_finite_params(params, paths: Sequence[str] | None = None) -> None:
  """Raises ValueError naming the first parameter (of `paths`, default all) holding NaN or inf."""
  flat = tree.flatten(params)
  for p in (paths if paths is not None else sorted(flat)):
    x = flat[p]
    if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"the model's parameter {p!r} holds NaN or inf values; nothing was edited")


# ---------------------------------------------------------------------------- greedy decoding


def greedy_answer(model: EditableModel, params, tokenizer, prompt: str, max_new_tokens: int = 3,
                  max_len: int | None = None) -> str:
  """Greedy continuation of `prompt` by a causal LM, stopping at eos/pad.

  The input is padded to a fixed length (max_len, default the model's context or 64), so the
  forward pass compiles once per (model, max_len). Returns the decoded new tokens, stripped.
  """
  max_len = max_len or model.max_length or 64
  ids = bos_ids(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds "
                     f"the context of {max_len}")
  stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
  fwd = _next_token_fn(model, max_len)
  new = []
  for _ in range(max_new_tokens):
    arr = np.zeros((1, max_len), np.int32)
    arr[0, : len(ids)] = ids
    mask = (np.arange(max_len) < len(ids)).astype(np.int32)[None]
    nxt = int(fwd(params, jnp.asarray(arr), jnp.asarray(mask), len(ids) - 1))
    if nxt in stop:
      break
    ids.append(nxt)
    new.append(nxt)
  return tokenizer.decode(new).strip()


@functools.lru_cache(maxsize=16)
def _next_token_fn(model: EditableModel, max_len: int):
  """Jitted (params, ids [1,max_len], mask [1,max_len], pos) -> the argmax token after pos."""
  del max_len  # part of the cache key: one compiled shape per length
  return jax.jit(lambda p, ids, mask, pos: jnp.argmax(
      model.logits(p, {"input_ids": ids, "attention_mask": mask})[0, pos]))
