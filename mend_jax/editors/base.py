"""The editor interface that MEND and every baseline implement, its state, and the jitted edit.

An editor edits the `layers` of one `EditableModel`. All its state is an explicit pytree,
`EditorState(params, aux)`: `params` is what Adam trains (empty for FT), `aux` what it carries
untrained (MEND's normalisation statistics; FT+KL's locality pool). Every method is pure:

  editor = editors.make("mend", model, {"rank": 64})
  state = editor.init(jax.random.PRNGKey(0), model.params)
  start = editor.pre_edit_params(state, model.params)    # the model an edit starts from
  new_params, info = editor.jit_edit(state, start, batch)
  loss, (new_aux, metrics) = editor.loss(state.params, state.aux, model.params, batch3, objective)

`edit` changes exactly the model's editable leaves (`model.layer_paths`); every other leaf of
the result is the input's own array. `info` holds at least loss_before: [] (the edit loss at the
starting point) and update_norm: [n_layers] (Frobenius norm of each matrix's change).
`loss` is Algorithm 1's objective of one micro-batch {"edit", "equiv", "loc"} (`losses.post_edit_loss`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mend_jax import losses, models, sharding, tree
from mend_jax.models import EditableModel

Batch = Mapping[str, jax.Array]


class EditorState(NamedTuple):
  """params: the pytree Adam trains (empty dict for FT and FT+KL); aux: what the editor carries
  untrained (MEND: normalisation statistics; FT+KL: locality pool and rng; ENN, KE: empty)."""

  params: Any
  aux: Any


class Editor(abc.ABC):
  """Base of every editor. Subclasses set `name` and `config_class` and implement `init` and
  `_edit` (the edit itself; `edit` checks its inputs around it); the other methods have the
  defaults that fit most editors. Objects hash by identity, so their methods can be jitted with
  the object as a static argument.

  Attributes:
    name: registry name ("mend", "ft", "ft_kl", "enn", "ke").
    model: the EditableModel whose `layers` the editor edits.
    cfg: the editor's frozen config dataclass (an instance of `config_class`).
    learned: whether `fit` trains it (False for FT, FT+KL: nothing to train).
    needs_loc_pool: whether an edit samples locality data, given by `with_loc_pool` (FT+KL, MEND
      with refinement steps).
    frozen_prefix: whether every parameter outside the editable layers stays the base model's,
      so that cached activations of the frozen blocks below them stay valid (False for ENN,
      which trains the whole model).
    static_edit_args: keyword arguments of `edit` that are static under jit.
  """

  name: str = ""
  config_class: type = object
  learned: bool = True
  needs_loc_pool: bool = False
  frozen_prefix: bool = True
  static_edit_args: tuple[str, ...] = ()

  def __init__(self, model: EditableModel, cfg: Any):
    if not isinstance(model, EditableModel):
      raise TypeError(f"{type(self).__name__} needs an EditableModel, got {type(model).__name__}")
    if not isinstance(cfg, self.config_class):
      raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
    self.model = model
    self.cfg = cfg

  @abc.abstractmethod
  def init(self, rng: jax.Array, base_params) -> EditorState:
    """The initial state (jittable, so `jax.eval_shape` gives its shapes)."""

  def prepare(self, state: EditorState, base_params, data) -> EditorState:
    """The initial state completed with what the editor measures once on the frozen model and the
    training split (`data`, an EditData) before training; the training loop calls it on a fresh
    start. Default: state unchanged."""
    del base_params, data
    return state

  @abc.abstractmethod
  def _edit(self, state: EditorState, params, batch: Batch, **static) -> tuple[Any, dict]:
    """The edit, on inputs `edit` has checked. Returns (new_params, info)."""

  def edit(self, state: EditorState, params, batch: Batch, *, check: bool = True, **static) -> tuple[Any, dict]:
    """Edits `params` so the model fits `batch` (k edits at once). Returns (new_params, info).

    Args:
      state: the editor's EditorState.
      params: the model's parameters (the starting point; see `pre_edit_params`).
      batch: an edit batch in the model's format (`mend_jax.models`), e.g. input_ids [k, T].
      check: check the batch first (`models.check_batch`: keys, shapes, dtypes, token ids,
        scored labels) and report non-finite parameters instead of editing them. Under jit or
        vmap only the static checks can run; callers inside their own jit that validated their
        data pass False.
      static: the editor's static options (MEND: diagnostics).
    """
    if check:
      models.check_batch(self.model, batch)
    new, info = self._edit(state, params, batch, **static)
    if check:
      check_edit_result(self.model, params, info)
    return new, info

  def pre_edit_params(self, state: EditorState, base_params):
    """The model an edit starts from and that "before" metrics use: `base_params` itself, except
    for editors that train their own copy of the model (ENN)."""
    del state
    return base_params

  def with_loc_pool(self, state: EditorState, loc_pool: Batch) -> EditorState:
    """`state` with a pool of locality examples for editors that sample one per edit step
    (`needs_loc_pool`); the others ignore it."""
    del loc_pool
    return state

  def param_labels(self, train_params) -> Any:
    """Which Adam trains each leaf of `train_params`: "net" (lr) or "alpha" (lr_lr)."""
    return jax.tree_util.tree_map(lambda _: "net", train_params)

  def loss(self, train_params, aux, base_params, batch: Mapping[str, Batch], objective: losses.Objective,
           train: bool = True):
    """Algorithm 1's loss of one micro-batch {"edit", "equiv", "loc"}: edit with batch["edit"], then
    objective.c_edit * L_e(equiv) + objective.c_loc * KL(p_base || p_edited)(loc).

    Args:
      train_params, aux: the two halves of an EditorState (params differentiated).
      base_params: the frozen original model.
      train: False (validation) keeps carried state such as statistics frozen.
    Returns:
      (loss [], (new_aux, metrics)): metrics as `losses.post_edit_loss`, plus loss_before and
      update_norm (mean over layers).
    """
    del train
    state = EditorState(train_params, aux)
    new, info = self.edit(state, self.pre_edit_params(state, base_params), batch["edit"], check=False)
    loss, metrics = losses.post_edit_loss(self.model, new, base_params, batch, objective)
    metrics.update(loss_before=info["loss_before"], update_norm=jnp.mean(info["update_norm"]))
    return loss, (aux, metrics)

  @property
  def jit_edit(self):
    """`edit` compiled without copying the model (`jit_edit` below)."""
    return jit_edit(self)


def check_edit_result(model: EditableModel, params, info: Mapping[str, jax.Array]) -> None:
  """After an edit on concrete arrays: a non-finite edit loss at the starting point means the
  parameters (or the batch) are broken; raises ValueError naming the first non-finite parameter
  instead of returning NaN kernels. No-op under tracing."""
  loss = info["loss_before"]
  if isinstance(loss, jax.core.Tracer) or bool(jnp.isfinite(loss)):
    return
  models.check_finite_params(params)
  raise ValueError(f"the edit loss at the starting point is {float(loss)} (the parameters are finite); "
                   "nothing was edited")


def jit_edit(editor: Editor, from_base: bool = False, static_argnames: tuple[str, ...] | None = None):
  """`editor.edit` compiled: (state, params, batch, check=True, **static) -> (new_params, info),
  the same result as jax.jit(editor.edit), without copying the model. Cached per (editor,
  from_base, static_argnames): every caller of one editor shares one compiled function. With
  check (the default) the batch is checked on the host before the call and the edit loss after
  it (`Editor.edit`).

  The compiled program returns only the edited leaves (`model.layer_paths`); they are put into
  the caller's tree on the host, whose other leaves are the caller's own (immutable) arrays. On a
  device mesh (`mend_jax.sharding`) each edited kernel keeps the sharding of the one it replaces. A
  jitted function copies every leaf it returns unchanged (JAX does not forward inputs to
  outputs): 0.1-0.15 s for a GPT-2 with 82M parameters on 2 CPU threads.

  Args:
    from_base: `params` is the base model and the edit starts from
      `editor.pre_edit_params(state, params)` (ENN: its trained copy), as evaluation and loaded
      checkpoints use it; otherwise the edit starts from `params`.
    static_argnames: keyword arguments of `edit` that are static (default:
      `editor.static_edit_args`; MEND: diagnostics).
  """
  if static_argnames is None:
    static_argnames = editor.static_edit_args
  return _compiled_edit(editor, bool(from_base), tuple(static_argnames))


@functools.lru_cache(maxsize=64)
def _compiled_edit(editor: Editor, from_base: bool, static_argnames: tuple[str, ...]):
  paths = editor.model.layer_paths

  def start(state, params):
    return editor.pre_edit_params(state, params) if from_base else params

  def edited_leaves(state, params, batch, **static):
    new, info = editor.edit(state, start(state, params), batch, check=False, **static)
    return tree.get_leaves(new, paths), info

  compiled = jax.jit(edited_leaves, static_argnames=static_argnames)

  @functools.wraps(editor.edit)
  def call(state, params, batch, check: bool = True, **static):
    if check:
      models.check_batch(editor.model, batch)
    leaves, info = compiled(state, params, batch, **static)
    begin = start(state, params)
    if check:
      check_edit_result(editor.model, begin, info)
    leaves = sharding.match_placement(leaves, tree.get_leaves(begin, paths))
    return tree.replace_leaves(begin, leaves), info

  call._cache_size = compiled._cache_size
  return call


def update_norms(model: EditableModel, old_params, new_params) -> jax.Array:
  """[n_layers] Frobenius norm of each editable matrix's change (float32)."""
  old, new = tree.get_leaves(old_params, model.layer_paths), tree.get_leaves(new_params, model.layer_paths)
  return jnp.stack([jnp.linalg.norm(new[p].astype(jnp.float32) - old[p].astype(jnp.float32))
                    for p in model.layer_paths])


def build_config(cls, cfg: Mapping | Any | None, section: str):
  """cls(**cfg) for a config dataclass, with a clear error naming unknown keys as section.key.

  cfg may be None (defaults), a mapping, or an instance of a config dataclass (an instance of
  cls is returned as is).
  """
  if cfg is None:
    cfg = {}
  if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
    if isinstance(cfg, cls):
      return cfg
    cfg = dataclasses.asdict(cfg)
  if hasattr(cfg, "to_dict"):  # an ml_collections ConfigDict
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise TypeError(f"config {section!r} must be a mapping of {cls.__name__} fields, got {type(cfg).__name__}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'{section}.{k}' for k in unknown]}; "
                     f"{section} ({cls.__name__}) accepts {sorted(fields)}")
  return cls(**dict(cfg))
