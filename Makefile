# Two entry points a new user needs (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint constraints clean

setup:
	scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/selfplay demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint:
	$(VENV)/bin/ruff check selfplay actors tests benchmarks

constraints:
	{ echo "# Versions tested together (torch 2.13.0 CPU wheel, Python 3.11). Regenerate with: make constraints"; \
	  $(VENV)/bin/pip freeze | grep -v -E '^(-e|selfplay|#)' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
