"""One small interface for every editor (MEND and the baselines FT, FT+KL, ENN, KE) and a registry.

An editor algorithm is an object with a few pure methods over an explicit state `AlgState`:

  alg = make_alg("enn", model, {"edit_lr": 1e-2})
  state = alg.init(jax.random.PRNGKey(0), base_params)
  start = alg.pre_edit_params(state, base_params)       # the model an edit starts from
  new_params, info = jax.jit(alg.edit)(state, start, edit_batch)
  new_params, info = jit_edit(alg)(state, start, edit_batch)  # the same, without copying the model

Learned algorithms (`alg.learned`) are trained by Adam on `state.params`, with two learning rates
picked per leaf by `alg.param_labels` ("net" -> lr, "alpha" -> lr_lr):

  loss, (new_aux, metrics) = alg.loss(state.params, state.aux, base_params, batch, Objective())

where batch = {"edit": ..., "equiv": ..., "loc": ...} as in `train.edit_loss` and the Objective
holds the loss weights shared by every learned editor (`TrainConfig.objective`). Every algorithm
changes exactly the model's editable leaves (`model.layer_paths`); all other leaves of the
returned tree are the input leaves, bit for bit.

Shared pieces live here too: `post_edit_loss` (the outer loss of Algorithm 1 given an edited
model) and `build_config` (a config dataclass from a mapping, with clear errors).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from mend_jax import losses
from mend_jax.mend import get_leaves, replace_leaves
from mend_jax.models import EditableModel

ALGS = ("mend", "ft", "ft_kl", "enn", "ke")
KL_POSITIONS = ("answer", "all")


class Objective(NamedTuple):
  """The training loss weights of Algorithm 1, the same for every learned editor (from
  `train.TrainConfig`): L = c_edit * L_e(equiv) + c_loc * KL(p_base || p_edited)(loc), the KL at
  the answer positions ("answer") or every non-pad token ("all")."""

  c_edit: float = 0.1
  c_loc: float = 1.0
  kl_positions: str = "answer"


class AlgState(NamedTuple):
  """params: pytree trained by Adam (empty dict for FT / FT+KL);
  aux: pytree carried along but not trained (MEND: normalisation statistics; FT+KL: the locality
  pool and its rng; ENN, KE: empty dict)."""

  params: Any
  aux: Any


@runtime_checkable
class EditorAlg(Protocol):
  """What every editor offers. Objects are hashed by identity, so their methods can be jitted with
  the object closed over or passed as a static argument; all state lives in `AlgState`.

  Attributes:
    name: registry name ("mend", "ft", "ft_kl", "enn", "ke").
    model: the `EditableModel` whose `layers` the editor edits.
    learned: True if `loss` / `param_labels` exist (ENN, KE, MEND); False for FT and FT+KL.
    needs_loc_pool (optional, default False): True if the editor samples locality data during an
      edit (FT+KL); give it with `with_loc_pool(state, pool) -> AlgState`.

  Methods (all pure; `edit` and `loss` are jittable):
    init(rng, base_params) -> AlgState.
    pre_edit_params(state, base_params) -> params: the model an edit starts from and that
      "before" metrics use (ENN: its trained copy of the model; the others: base_params).
    edit(state, params, batch) -> (new_params, info): edits `params` so the model fits `batch`, one
      edit batch of k edits at once, in the same dict format as `mend.MEND.edit` (see
      `mend_jax.models`). info is a dict of arrays; every algorithm reports at least
      loss_before: [] (the edit loss it differentiates, at `params`) and update_norm: [n_layers] (Frobenius
      norm of each editable matrix's change).
    loss(train_params, aux, base_params, batch, objective, train=True) -> (loss, (new_aux, metrics)):
      learned only; batch = {"edit", "equiv", "loc"} as in `train.edit_loss`; base_params is the
      frozen original model (never trained); objective an `Objective`; train=False (validation)
      keeps carried statistics frozen. metrics hold at least loss, loss_edit, loss_loc,
      edit_success, loc_agree (same meaning as in `train.edit_loss`).
    param_labels(train_params) -> pytree of "net" / "alpha" strings, one per leaf of train_params:
      which Adam (lr or lr_lr) trains each leaf (use with optax.multi_transform).
  """

  name: str
  model: EditableModel
  learned: bool

  def init(self, rng: jax.Array, base_params) -> AlgState: ...

  def pre_edit_params(self, state: AlgState, base_params): ...

  def edit(self, state: AlgState, params, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]: ...

  def loss(self, train_params, aux, base_params, batch: Mapping[str, Mapping[str, jax.Array]],
           objective: Objective, train: bool = True): ...

  def param_labels(self, train_params): ...


# ------------------------------------------------------------------ shared pieces
def jit_edit(alg, from_base: bool = False, static_argnames: tuple[str, ...] = ()):
  """`alg.edit` compiled: (state, params, batch, **static) -> (new_params, info), the same result as
  jax.jit(alg.edit), without copying the model.

  The compiled program returns only the edited leaves (`model.layer_paths`); they are put into the
  caller's tree on the host, whose other leaves are the caller's own (immutable) arrays. A jitted
  function copies every leaf it returns unchanged (JAX 0.10 does not forward inputs to outputs):
  0.1-0.15 s for a GPT-2 with 82M parameters on 2 CPU threads, partly hidden behind the edit's
  own work (docs/bench.md).

  from_base: `params` is the base model and the edit starts from alg.pre_edit_params(state, params)
  (ENN: its trained copy), as evaluation and loaded checkpoints use it; otherwise from `params`.
  static_argnames: keyword arguments of alg.edit that are static (MEND: diagnostics).
  """
  paths = alg.model.layer_paths
  pre = getattr(alg, "pre_edit_params", None) if from_base else None

  def start(state, params):
    return params if pre is None else pre(state, params)

  def edited_leaves(state, params, batch, **static):
    new, info = alg.edit(state, start(state, params), batch, **static)
    return get_leaves(new, paths), info

  compiled = jax.jit(edited_leaves, static_argnames=static_argnames)

  @functools.wraps(alg.edit)
  def call(state, params, batch, **static):
    leaves, info = compiled(state, params, batch, **static)
    return replace_leaves(start(state, params), leaves), info

  call._cache_size = compiled._cache_size
  return call


def build_config(cls, cfg: Mapping | None, alg_name: str):
  """cls(**cfg) for a config dataclass, with a clear error naming unknown keys as alg_name.key
  (alg_name: the config section, e.g. "enn" or "train")."""
  if cfg is None:
    cfg = {}
  if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
    if isinstance(cfg, cls):
      return cfg
    cfg = dataclasses.asdict(cfg)
  if not isinstance(cfg, Mapping):
    raise TypeError(f"config for {alg_name!r} must be a mapping of {cls.__name__} fields, got {type(cfg).__name__}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"unknown config key(s) {[f'{alg_name}.{k}' for k in unknown]}; "
                     f"{alg_name} ({cls.__name__}) accepts {sorted(fields)}")
  return cls(**dict(cfg))


def check_kl_positions(value: str) -> None:
  if value not in KL_POSITIONS:
    raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {value!r}")


def loc_batch(batch: Mapping[str, jax.Array], kl_positions: str) -> dict:
  """The locality batch the KL reads (as train.py): "answer" keeps it as is; "all" drops kl_mask
  and the read positions, so the KL covers every non-pad token (see `losses.kl_mask`)."""
  if kl_positions == "all":
    return {k: v for k, v in batch.items() if k not in ("kl_mask", "read_pos", "read_mask")}
  return dict(batch)


def edit_nll(model: EditableModel, params, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The loss a one-shot edit differentiates, as MEND's: the sum over the batch's edits of each
  edit's token-mean NLL (`losses.nll_per_edit_sum`; equal to the token mean for one edit), so
  each of k edits gets the step it would get alone."""
  return losses.nll_per_edit_sum(model.task, model.logits(params, batch), batch)


def post_edit_loss(model: EditableModel, edited_params, ref_params, batch, c_edit: float, c_loc: float,
                   kl_positions: str = "answer", ref_logits: jax.Array | None = None):
  """The outer loss of Algorithm 1 for an edited model: c_edit * L_e + c_loc * L_loc.

  L_e = token-mean NLL of `edited_params` on batch["equiv"]; L_loc = KL(p_ref || p_edited) on
  batch["loc"] (`losses.locality_kl`), p_ref from `ref_params` under stop_gradient (or the given
  ref_logits: the logits of the reference on `loc_batch(batch["loc"], kl_positions)`).
  Returns (loss, metrics) with metrics loss, loss_edit, loss_loc, edit_success (mean exact match
  on "equiv"), loc_agree (fraction of locality examples whose exact match is unchanged).
  """
  task = model.task
  eq_logits = model.logits(edited_params, batch["equiv"])
  l_edit = losses.nll(task, eq_logits, batch["equiv"])
  loc = loc_batch(batch["loc"], kl_positions)
  if ref_logits is None:
    ref_logits = model.logits(ref_params, loc)
  ref_logits = jax.lax.stop_gradient(ref_logits)
  post_logits = model.logits(edited_params, loc)
  l_loc = losses.locality_kl(task, ref_logits, post_logits, loc)
  loss = c_edit * l_edit + c_loc * l_loc
  metrics = {
      "loss": loss, "loss_edit": l_edit, "loss_loc": l_loc,
      "edit_success": jnp.mean(losses.exact_match(task, eq_logits, batch["equiv"])),
      "loc_agree": jnp.mean(losses.exact_match(task, post_logits, batch["loc"])
                            == losses.exact_match(task, ref_logits, batch["loc"])),
  }
  return loss, metrics


def update_norms(model: EditableModel, old_params, new_params) -> jax.Array:
  """[n_layers] Frobenius norm of each editable matrix's change (float32)."""
  old, new = get_leaves(old_params, model.layer_paths), get_leaves(new_params, model.layer_paths)
  return jnp.stack([jnp.linalg.norm((new[p].astype(jnp.float32) - old[p].astype(jnp.float32)))
                    for p in model.layer_paths])


# ------------------------------------------------------------------ registry
def make_alg(name: str, model: EditableModel, cfg: Mapping | None = None) -> EditorAlg:
  """The editor `name` (one of ALGS) for `model`, configured by `cfg` (fields of its config class:
  MEND: editor.EditorConfig; ft: baselines.FTConfig; ft_kl: baselines.FTKLConfig; enn:
  baselines.ENNConfig; ke: baselines.KEConfig). Unknown names or keys raise ValueError.

  "mend" returns `mend.MEND` itself (its adapter to this interface is built elsewhere)."""
  if name not in ALGS:
    raise ValueError(f"unknown editor {name!r}; expected one of {ALGS}")
  if not isinstance(model, EditableModel):
    raise TypeError(f"make_alg needs an EditableModel, got {type(model).__name__}")
  if name == "mend":
    from mend_jax.editor import EditorConfig
    from mend_jax.mend import MEND

    return MEND(model, build_config(EditorConfig, cfg, name))
  from mend_jax import baselines

  if name == "ft":
    return baselines.FT(model, build_config(baselines.FTConfig, cfg, name))
  if name == "ft_kl":
    return baselines.FT(model, build_config(baselines.FTKLConfig, cfg, name))
  if name == "enn":
    return baselines.ENN(model, build_config(baselines.ENNConfig, cfg, name))
  return baselines.KE(model, build_config(baselines.KEConfig, cfg, name))
