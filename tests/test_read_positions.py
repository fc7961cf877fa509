"""Logits only where a loss reads them: same losses and metrics as the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_batch, tiny_model
from mend_jax import losses
from mend_jax.data import IGNORE, read_positions


def test_read_positions_by_hand():
  labels = np.array([[IGNORE, IGNORE, 5, 6, IGNORE],
                     [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
  kl = np.array([[0, 0, 0, 0, 0],
                 [0, 0, 0, 1, 1]])
  # causal: position t reads label t+1.
  pos, mask = read_positions(labels)
  np.testing.assert_array_equal(pos, [[1, 2], [0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])
  pos, mask = read_positions(labels, kl)
  np.testing.assert_array_equal(pos, [[1, 2, 0], [0, 3, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1]])
  # seq2seq: no shift.
  pos, mask = read_positions(labels, seq2seq=True)
  np.testing.assert_array_equal(pos, [[2, 3], [1, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])


def _with_read(model, batch, kl=None):
  b = {k: np.asarray(v) for k, v in batch.items()}
  if kl is not None:
    b["kl_mask"] = kl
  pos, mask = read_positions(b["labels"], b.get("kl_mask"), seq2seq=model.task == "seq2seq")
  return {k: jnp.asarray(v) for k, v in b.items()}, {**{k: jnp.asarray(v) for k, v in b.items()},
                                                     "read_pos": jnp.asarray(pos), "read_mask": jnp.asarray(mask)}


# One family per way of calling the head: tied via apply (gpt2), tied and rescaled (t5), with a
# final bias (bart), untied (llama).
@pytest.mark.parametrize("name", ["gpt2", "t5", "bart", "llama"])
def test_losses_at_read_positions_equal_full(name):
  model = tiny_model(name)
  batch = make_batch(model, seed=7, batch=3, length=8, n_labels=3, pad=2)
  t = batch["labels"].shape[1]
  kl = np.zeros((3, t), np.int32)
  kl[:, 1:4] = 1  # KL positions that are not all label positions
  full_b, read_b = _with_read(model, batch, kl)
  other = jax.tree_util.tree_map(lambda x: x * 1.1, model.params)  # a second model for the KL
  def metrics(p, q, b):
    lp, lq = model.logits(p, b), model.logits(q, b)
    return {"nll": losses.nll(model.task, lp, b), "per_edit": losses.nll_per_edit_sum(model.task, lp, b),
            "em": losses.exact_match(model.task, lp, b), "kl": losses.locality_kl(model.task, lp, lq, b),
            "shape": jnp.zeros(lp.shape[:2])}

  fn = jax.jit(metrics)
  a, r = fn(model.params, other, full_b), fn(model.params, other, read_b)
  assert r["shape"].shape[1] < a["shape"].shape[1]  # fewer positions were projected
  assert float(a["kl"]) > 0
  for k in ("nll", "per_edit", "em", "kl"):
    np.testing.assert_allclose(np.asarray(r[k]), np.asarray(a[k]), rtol=2e-5, atol=1e-7, err_msg=k)


def test_capture_at_read_positions_equals_full():
  from mend_jax import capture

  model = tiny_model("gpt2")
  full_b, read_b = _with_read(model, make_batch(model, seed=8, batch=2, length=8, n_labels=3, pad=1))
  fn = jax.jit(lambda b: capture.capture(model, model.params, b))
  a, r = fn(full_b), fn(read_b)
  np.testing.assert_allclose(float(r.loss), float(a.loss), rtol=1e-6)
  for p in model.layer_paths:
    np.testing.assert_allclose(np.asarray(r.u[p]), np.asarray(a.u[p]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(r.delta[p]), np.asarray(a.delta[p]), rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(a.delta[p]).max()) > 0


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_head_local_layers_have_delta_only_at_read_positions(name):
  """The family knowledge behind MEND's row selection: in the last block's MLP, delta is exactly
  zero off the read positions; so an edit from the selected rows equals the edit from all rows."""
  from mend_jax import capture
  from mend_jax.editor import EditorConfig
  from mend_jax.mend import MEND

  model = tiny_model(name)
  assert model.head_local_paths
  full_b, read_b = _with_read(model, make_batch(model, seed=9, batch=2, length=8, n_labels=3, pad=1))
  cap = jax.jit(lambda b: capture.capture(model, model.params, b))(full_b)
  pos, mask = np.asarray(read_b["read_pos"]), np.asarray(read_b["read_mask"])
  for p in model.head_local_paths:
    d = np.asarray(cap.delta[p])
    off = np.ones(d.shape[:2], bool)
    for i in range(d.shape[0]):
      off[i, pos[i][mask[i] == 1]] = False
    assert np.abs(d[~off]).max() > 0 and np.abs(d[off]).max() == 0, p
  ed = MEND(model, EditorConfig(rank=4))
  st = ed.init(jax.random.PRNGKey(0))
  st = st._replace(stats=jax.jit(lambda b: ed.update_stats(st.stats, ed.capture(model.params, b)))(full_b))
  net = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), st.params["net"])
  st = st._replace(params={**st.params, "net": net})
  a, r = ed.jit_edit(st, model.params, full_b)[0], ed.jit_edit(st, model.params, read_b)[0]
  fa, fr = (dict(jax.tree_util.tree_leaves_with_path(x)) for x in (a, r))
  for k in fa:
    np.testing.assert_allclose(np.asarray(fr[k]), np.asarray(fa[k]), rtol=1e-5, atol=1e-7)
