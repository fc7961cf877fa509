"""mend-jax: MEND (Model Editor Networks with Gradient Decomposition) in JAX/Flax.

Core API:
  model = load_model("path/or/name")             # or model_from_config(hf_config)
  editor = MEND(model, EditorConfig(rank=1920))
  state = editor.init(jax.random.PRNGKey(0))
  new_params, info = editor.jit_edit(state, model.params, batch)
"""

from mend_jax import capture  # the module: capture.capture(model, params, batch)
from mend_jax.capture import Capture, rank1_sum, token_mask
from mend_jax.editor import EditorConfig
from mend_jax.mend import MEND, EditorState, check_batch
from mend_jax.models import FAMILIES, EditableModel, Layer, load_model, model_from_config

__all__ = [
    "Capture", "capture", "rank1_sum", "token_mask", "EditorConfig", "MEND", "EditorState",
    "check_batch", "FAMILIES", "EditableModel", "Layer", "load_model", "model_from_config",
]
