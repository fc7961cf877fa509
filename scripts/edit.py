"""Apply one edit with a trained editor and show the model's answers before and after.

  python scripts/edit.py --workdir runs/demo --prompt "The capital of Zorvak is" --target Plint \
      [--paraphrase "Zorvak's capital city is"] [--unrelated "The currency of Lefes is the"]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags

from scripts import common

_WORKDIR = flags.DEFINE_string("workdir", None, "work directory holding the checkpoints", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "edit prompt x_e", required=True)
_TARGET = flags.DEFINE_string("target", None, "new answer y_e", required=True)
_PARA = flags.DEFINE_string("paraphrase", None, "a paraphrase of the prompt (default: the prompt)")
_UNREL = flags.DEFINE_string("unrelated", None, "an unrelated prompt (default: one from the test split)")


def main(argv):
  del argv

  def run():
    from mend_jax import experiment

    config = common.stored_config(_WORKDIR.value)
    task = experiment.prepare(config)
    other = task.test.records[0]
    record = {"src": _PROMPT.value, "alt": _TARGET.value, "rephrase": _PARA.value or _PROMPT.value,
              "loc": _UNREL.value or other["loc"], "loc_ans": other["loc_ans"] if not _UNREL.value else "-"}
    experiment.show_edit(_WORKDIR.value, task, record)

  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
