# hoexp developer entry points. `make run` installs (once) and runs the default experiment;
# `make test` installs (once) and runs the test suite. The virtual environment lives outside
# the clone, keyed by the hash of requirements.txt, so fresh clones (and CI) reuse it.
PYTHON ?= python3
REQ_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('requirements.txt','rb').read()).hexdigest()[:12])")
HOEXP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/hoexp
VENV ?= $(HOEXP_CACHE)/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
# The small real datasets beside the clone (../shared/data) when they are there; else the loaders default.
HOEXP_DATA ?= $(wildcard $(abspath ../shared/data))
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install venv run test test-fast lint format tb bench clean-venv

# hoexp is installed (editable) from this clone unless the venv already has that: the check runs
# from / so that Python cannot pick up ./hoexp from the working directory, and the console script
# must exist, as must the parallel launcher's Hydra plugin (hydra_plugins/hoexp_launcher). Any other
# clone's install is replaced.
install: $(VENV)/.deps-ok
	@cd / && test -x $(VENV)/bin/hoexp && $(PY) -c "import hoexp, hydra_plugins.hoexp_launcher as p, pathlib, sys; \
	  sys.exit(pathlib.Path(hoexp.__file__).resolve().parent != pathlib.Path('$(CURDIR)/hoexp').resolve() \
	  or pathlib.Path(p.__file__).resolve().parent != pathlib.Path('$(CURDIR)/hydra_plugins/hoexp_launcher').resolve())" \
	  2>/dev/null || $(PY) -m pip install --quiet --no-deps --no-build-isolation -e "$(CURDIR)"

# No prerequisites on purpose: the path already encodes requirements.txt's hash, and a fresh
# clone's newer file times must not trigger a 1.5-minute reinstall.
$(VENV)/.deps-ok:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -r requirements.txt  # -qq: hide pip.conf index warnings
	touch $@

# The environment's folder: source "$$(make -s venv)/bin/activate"
venv: install
	@echo $(VENV)

run: install
	HOEXP_DATA=$(HOEXP_DATA) $(VENV)/bin/hoexp run $(ARGS)

# The README's first command on a short configuration (in a scratch folder), then the suite.
SMOKE_DIR := $(shell mktemp -u -d -t hoexp-smoke-XXXXXX)
test: install
	$(MAKE) --no-print-directory run ARGS="outer_steps=2 inner_steps=5 progress=false hydra.run.dir=$(SMOKE_DIR)"
	rm -rf $(SMOKE_DIR)
	HOEXP_DATA=$(HOEXP_DATA) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	HOEXP_DATA=$(HOEXP_DATA) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff (lint and format) and mypy, all configured in pyproject.toml; `make format` applies ruff's formatting.
LINTED := hoexp hydra_plugins tests scripts examples
lint: install
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy hoexp hydra_plugins scripts examples

format: install
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

tb: install
	$(VENV)/bin/tensorboard --logdir outputs

bench: install
	HOEXP_DATA=$(HOEXP_DATA) $(PY) scripts/bench.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
