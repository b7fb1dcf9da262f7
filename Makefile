# hoexp developer entry points. `make run` installs (once) and runs the default experiment;
# `make test` installs (once) and runs the test suite. The virtual environment lives outside
# the clone, keyed by the hash of requirements.txt, so fresh clones (and CI) reuse it.
PYTHON ?= python3
REQ_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('requirements.txt','rb').read()).hexdigest()[:12])")
HOEXP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/hoexp
VENV ?= $(HOEXP_CACHE)/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
HOEXP_DATA ?= $(abspath ../shared/data)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast tb bench clean-venv

install: $(VENV)/.deps-ok
	@$(PY) -c "import hoexp, pathlib, sys; sys.exit(pathlib.Path(hoexp.__file__).resolve().parent != pathlib.Path('hoexp').resolve())" 2>/dev/null \
	  || $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

# No prerequisites on purpose: the path already encodes requirements.txt's hash, and a fresh
# clone's newer file times must not trigger a 1.5-minute reinstall.
$(VENV)/.deps-ok:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -r requirements.txt  # -qq: hide pip.conf index warnings
	touch $@

run: install
	$(VENV)/bin/hoexp run $(ARGS)

test: install
	HOEXP_DATA=$(HOEXP_DATA) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	HOEXP_DATA=$(HOEXP_DATA) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

tb: install
	$(VENV)/bin/tensorboard --logdir outputs

bench: install
	$(PY) scripts/bench.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
