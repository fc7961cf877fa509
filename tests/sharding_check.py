"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): compares sharded edits, a sharded training
step and checkpoints moved between meshes with the single-device computation, and prints one JSON
object of measurements (the test asserts on them).

  python tests/sharding_check.py WORKDIR
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_batch, tiny_model  # noqa: E402

from mend_jax import checkpoint as ckpt_lib  # noqa: E402
from mend_jax import editors, models, sharding, train, tree  # noqa: E402
from mend_jax import evaluate as eval_lib  # noqa: E402
from mend_jax.data.batches import EditData  # noqa: E402
from mend_jax.synthetic import benchmark  # noqa: E402
from mend_jax.synthetic.world import WorldConfig  # noqa: E402


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def split_leaves(arrays) -> int:
  """How many arrays are stored in pieces (one device holds less than the whole array)."""
  return sum(1 for x in jax.tree_util.tree_leaves(arrays) if x.addressable_shards[0].data.shape != x.shape)


def edits(out: dict) -> None:
  mesh = sharding.make_mesh(4, 2)
  for family in ("gpt2", "llama", "t5"):
    model = tiny_model(family)
    ed = editors.make("mend", model, {"rank": 4})
    state = ed.init(jax.random.PRNGKey(0), model.params)
    batch = make_batch(model, seed=3, batch=4)
    single, info1 = ed.jit_edit(state, model.params, batch)
    params = sharding.shard_params(model, model.params, mesh)
    sharded, info2 = ed.jit_edit(jax.device_put(state, sharding.replicated(mesh)), params,
                                 sharding.shard_batch(batch, mesh))
    new = tree.get_leaves(sharded, model.layer_paths)
    old = tree.get_leaves(params, model.layer_paths)
    out[f"edit/{family}"] = {
        "max_diff": max_diff(tree.get_leaves(single, model.layer_paths), new),
        "loss_diff": abs(float(info1["loss_before"]) - float(info2["loss_before"])),
        "n_devices": len(next(iter(new.values())).sharding.device_set),
        "split_params": split_leaves(params),
        "n_params": len(jax.tree_util.tree_leaves(params)),
        "split_edited": split_leaves(new),
        "same_sharding": all(new[p].sharding.is_equivalent_to(old[p].sharding, old[p].ndim) for p in new),
        "batch_split": split_leaves(sharding.shard_batch(batch, mesh)),
    }


def synthetic(root: str):
  paths = benchmark.write_benchmark(os.path.join(root, "world"), WorldConfig(seed=1, n_subjects=30))
  tok = tf.AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
  model = models.model_from_config(tf.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2,
                                                 n_head=2, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id))
  return model, EditData.from_records(benchmark.load_records(paths["train"]), tok, 24)


def training(out: dict, root: str) -> None:
  model, data = synthetic(root)
  # The least-squares editor with the key-preservation term: `prepare` measures its penalty roots
  # on the (sharded) base model, and training, checkpoints and evaluation carry them.
  ed = editors.make("mend", model, {"rank": 8, "aggregation": "least_squares", "preserve": 2.0})
  cfg = train.TrainConfig(lr=1e-3, lr_lr=1e-3, accumulate=1, max_steps=4, n_edits=4, n_loc=8, val_every=4,
                          n_val=2, log_every=1, ckpt_every=2, patience=100)
  tx = train.make_optimizer(cfg, ed)
  batch = data.sample(0, 0, cfg.n_edits, cfg.n_loc)

  def prepared(state, base):
    return state._replace(editor=ed.prepare(state.editor, base, data, max_rows=12, batch_size=8))

  start = prepared(train.init_state(ed, tx, 0, model.params), model.params)
  want_roots = jax.device_get(start.editor.aux["preserve"])  # the step donates `start`
  single, m1 = train.make_train_step(ed, cfg)(start, model.params, batch)
  mesh = sharding.make_mesh(4, 2)
  params = sharding.shard_params(model, model.params, mesh)
  for shard_editor in (False, True):
    state = train.init_state(ed, tx, 0, params, mesh, shard_editor)
    placed = {k: v.sharding for k, v in state.editor.aux["preserve"].items()}
    state = prepared(state, params)
    roots = state.editor.aux["preserve"]
    out[f"prepare/shard_editor={shard_editor}"] = {
        "max_diff": max_diff(want_roots, roots),
        "not_identity": max_diff(roots, train.init_state(ed, tx, 0).editor.aux["preserve"]),
        "same_sharding": all(roots[k].sharding.is_equivalent_to(placed[k], 2) for k in roots),
        "n_devices": len(next(iter(roots.values())).sharding.device_set),
    }
    new, m2 = train.make_train_step(ed, cfg, None, mesh, shard_editor)(state, params, sharding.shard_batch(batch, mesh))
    out[f"train_step/shard_editor={shard_editor}"] = {
        "max_diff": max_diff(single.editor.params, new.editor.params),
        "aux_diff": max_diff(single.editor.aux, new.editor.aux),
        "loss": [float(m1["loss"]), float(m2["loss"])],
        "update": max_diff(single.editor.params, train.init_state(ed, tx, 0).editor.params),
        "split_state": split_leaves(new.editor.params),
    }

  # A checkpoint written on (4, 2) with the editor split (one validation, at the last step: the best is the
  # final state), restored onto (8, 1), (8, 1) split, one device.
  wd = os.path.join(root, "run")
  state, _ = train.fit(ed, cfg, params, data, data, wd, mesh=mesh, shard_editor=True)
  expect = jax.device_get(ckpt_lib.load_editor(wd, model).state)
  out["checkpoint/saved_split"] = split_leaves(state.editor.params)
  for name, target, split in (("8x1", sharding.make_mesh(8, 1), False), ("8x1_split", sharding.make_mesh(1, 8), True),
                              ("one_device", None, False)):
    loaded = ckpt_lib.load_editor(wd, model, mesh=target, shard_editor=split)
    leaves = jax.tree_util.tree_leaves(loaded.state)
    out[f"checkpoint/{name}"] = {
        "max_diff": max_diff(expect, loaded.state),
        "trained_vs_saved": max_diff(state.editor, loaded.state),
        "n_devices": len(leaves[0].sharding.device_set),
        "split": split_leaves(loaded.state.params),
    }
  # Evaluation (batched and sequential) with the editor and the model on the mesh.
  one = ckpt_lib.load_editor(wd, model)
  on_mesh = ckpt_lib.load_editor(wd, model, mesh=mesh, shard_editor=True)
  keys = ("edit_success", "reliability", "locality_unchanged", "ppl_pre", "ppl_post")
  for name, fn in (("batched", eval_lib.evaluate), ("sequential", eval_lib.evaluate_sequential)):
    a = fn(one.editor, one.state, model.params, data, n_edits=8, k=4)
    b = fn(on_mesh.editor, on_mesh.state, params, data, n_edits=8, k=4)
    out[f"evaluate/{name}"] = {k: [a[k], b[k]] for k in keys}
  # Resuming the run on another mesh continues from the checkpoint.
  more = train.fit(ed, train.TrainConfig(**{**cfg.__dict__, "max_steps": 6}), model.params, data, data, wd)[0]
  out["checkpoint/resumed_one_device_steps"] = int(more.step)


def main():
  root = sys.argv[1]
  out = {"devices": jax.device_count()}
  edits(out)
  training(out, root)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
