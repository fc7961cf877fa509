"""mend-jax: MEND (Model Editor Networks with Gradient Decomposition) in JAX/Flax.

Core API:
  model = load_model("path/or/name")             # or model_from_config(hf_config)
  editor = MEND(model, MENDConfig(rank=1920))     # or editors.make("enn", model, {...})
  state = editor.init(jax.random.PRNGKey(0))
  new_params, info = editor.jit_edit(state, model.params, batch)
  loaded = load_editor("runs/demo", model)        # a trained editor from a work directory
  log = EditLog(editor, state); params = log.apply(params, batch)   # revertible, exportable edits

Layout (imports go downward only): tree; compat, models; losses; capture, stats; editors/
(base: the interface; mend, mend_net, ft, enn, ke); sharding; data/ (batches, official, formats,
realfacts); checkpoint, train, evaluate, report, edit_log; synthetic/ (world, benchmark, pretrain);
paper, experiment; configs/; bench, cli.
"""

from mend_jax import capture, editors, losses, models, tree
from mend_jax.capture import Capture, rank1_sum, token_mask
from mend_jax.checkpoint import LoadedEditor, load_editor
from mend_jax.edit_log import EditLog
from mend_jax.editors import MEND, Editor, EditorState, MENDConfig
from mend_jax.models import FAMILIES, EditableModel, Layer, check_batch, load_model, model_from_config

__all__ = [
    "capture", "editors", "losses", "models", "tree", "Capture", "rank1_sum", "token_mask", "LoadedEditor",
    "load_editor", "MEND", "Editor", "EditorState", "MENDConfig", "FAMILIES", "EditableModel", "Layer",
    "check_batch", "load_model", "model_from_config", "EditLog",
]
