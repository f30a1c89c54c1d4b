# multilora — two commands:
#   make demo   set up whatever is missing, then run the demo (RL on SmolLM2-135M, CPU)
#   make test   set up whatever is missing, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= models/smollm2-135m

.PHONY: setup setup-cluster lock demo test test-bus lint typecheck bench-bus model clean

# Setup installs the exact versions of requirements.lock (what CI tested), then this package
# without resolving anything again. `make lock` re-resolves pyproject.toml's ranges in a scratch
# virtualenv and rewrites the lock file (review the diff, run `make test`, commit both).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch, pinned: a bare `torch` would pull multi-GB CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q '.[dev]'
	{ echo "# Exact versions CI tested (Python 3.11, CPU; the dev extra). Install: make setup. Refresh: make lock."; \
	  echo "# torch is the CPU build pinned in the Makefile (a bare torch pulls multi-GB CUDA builds)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^multilora'; } > requirements.lock
	.lock-venv/bin/python -m pip install -q '.[cluster]'
	{ echo "# The cluster extra (Ray) on top of requirements.lock, as CI tested it. make test installs it."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^multilora' \
	    | grep -vxF -f requirements.lock; } > requirements-cluster.lock
	rm -rf .lock-venv

setup: $(VENV)/.installed

# Ray (the cluster extra) only for the tests that need it: the demo and `multilora up` never
# import it
$(VENV)/.cluster: requirements-cluster.lock | $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-cluster.lock
	touch $@

setup-cluster: $(VENV)/.cluster

$(MODEL)/config.json: | $(VENV)/.installed
	$(PY) -m ops.models smollm2 $(MODEL)

model: $(MODEL)/config.json

demo: setup model
	$(VENV)/bin/multilora demo --model $(MODEL)

test: setup setup-cluster  # pytest's exit 5 ("no tests collected") is not a failure
	$(VENV)/bin/pytest -q || [ $$? -eq 5 ]

test-bus: setup
	$(VENV)/bin/pytest -q -m bus tests/bus

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

bench-bus: setup
	$(PY) bench/bus.py --out bench/results/bus.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
