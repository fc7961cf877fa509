# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q -e .   # the package and its console scripts; its dependencies are the pinned set
	touch $(STAMP)

setup: $(STAMP)

# Offline demo: synthetic world -> pretrain a tiny GPT-2 -> train MEND -> evaluate -> checkpoint -> one edit.
demo: $(STAMP)
	$(BIN)/mend-train --workdir runs/demo

# Two workers (pytest-xdist; tests marked with one xdist_group run on one worker) sharing one compilation
# cache (tests/conftest.py): the suite is CPU-bound
# tracing and compiling, so this halves its wall time on a 2-core machine.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(BIN)/mend-bench

clean:
	rm -rf $(VENV) runs cache
