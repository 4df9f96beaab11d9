# QLab: two commands do everything on a fresh machine.
#   make book   build the course (executes every chapter) into _build/html and release the labs
#   make test   run the test suite
# Both create .venv (Python >= 3.11) and install the pinned dependencies on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Keep notebook execution and tests off the network and off stray user config.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

NATIVE := qlab/kernels/_qlab_cpu.so
CC     ?= gcc

.PHONY: book test release clean venv native browser interop

venv: $(STAMP) native

# qlab's own C kernels (qlab/kernels/csrc): optional. Without a C compiler the build says so and every
# layer runs on torch's kernels instead (qlab.kernels.native.available() is False).
native: $(NATIVE)

$(NATIVE): qlab/kernels/csrc/qlab_cpu.c
	@($(CC) -O3 -fopenmp -fPIC -shared -o $@.tmp $< 2>/dev/null || $(CC) -O3 -fPIC -shared -o $@.tmp $<) \
	  && mv -f $@.tmp $@ \
	  || echo "qlab: C kernels not built (no working C compiler); torch's kernels will be used"

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; v=sys.version_info; sys.exit(0 if v >= (3, 11) else "QLab needs Python >= 3.11, found %d.%d: run make PYTHON=python3.11 ..." % v[:2])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qlab)" >/dev/null
	@touch $(STAMP)

release: $(STAMP)
	$(PY) -m labs.release

# Chapter outputs are cached (_build/.jupyter_cache, keyed by each chapter's source). The cache is dropped
# whenever what the chapters run on changes: qlab's sources and checkpoints, the lock file, the config.
BOOK_INPUTS := $(shell find qlab -type f \( -name '*.py' -o -name '*.c' -o -name '*.pt' -o -name '*.safetensors' -o -name '*.json' -o -name '*.md' \) 2>/dev/null | sort) requirements.lock _config.yml

book: $(STAMP) native release
	@mkdir -p _build
	@sum=$$(cat $(BOOK_INPUTS) | sha256sum | cut -c1-16); \
	  if [ "$$(cat _build/.qlab-inputs 2>/dev/null)" != "$$sum" ]; then \
	    rm -rf _build/.jupyter_cache && echo "qlab: library or config changed: every chapter executes again"; fi; \
	  echo "$$sum" > _build/.qlab-inputs
	$(VENV)/bin/jupyter-book build . --builder html --warningiserror --keep-going
	@echo "Book built: _build/html/index.html"

# The browser tests (tests/test_site.py) read the built book in Debian's Chromium. As root (CI) it is
# installed here when missing; otherwise those tests are skipped and say how to get it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$QLAB_CHROMIUM" ] \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null)) \
	       && echo "qlab: installed Debian's chromium for the browser tests"; } \
	  || echo "qlab: no Chromium (apt-get install chromium, or set QLAB_CHROMIUM); the browser tests will be skipped"

test: $(STAMP) native browser
	$(PY) -m pytest
	$(MAKE) --no-print-directory interop

# AutoGPTQ 0.7.1 needs transformers 4.45.2 and peft 0.10, older than the main environment's: it gets its own
# environment from interop/requirements.txt, and its tests (interop/tests) import qlab from this checkout.
INTEROP       := .venv-interop
INTEROP_STAMP := $(INTEROP)/.installed-stamp

$(INTEROP_STAMP): interop/requirements.txt
	@test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(INTEROP)/bin/python -m pip install --quiet torch==2.13.0
	BUILD_CUDA_EXT=0 $(INTEROP)/bin/python -m pip install --quiet -r interop/requirements.txt
	@touch $(INTEROP_STAMP)

# llama.cpp through llama-cpp-python 0.3.36, built from its sdist into the same environment (interop/requirements-
# llama.txt) with the system cmake and C++ compiler: interop/tests/test_llama_cpp.py loads qlab's GGUF files in it
# and bench/llama_cpp.py times it against qlab. -DLLAVA_BUILD=OFF skips the multimodal library (libmtmd) that qlab
# never calls: 140 compile steps instead of 193, a fifth less CPU time (README.md has the times). Where it
# does not build (no C++ compiler), make interop says so and the llama.cpp tests are skipped; LLAMA_CPP=0 skips
# the build on purpose.
LLAMA_CPP        ?= 1
LLAMA_STAMP      := $(INTEROP)/.llama-cpp-stamp
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

$(LLAMA_STAMP): interop/requirements-llama.txt $(INTEROP_STAMP)
	@echo "qlab: building llama-cpp-python from source for interop/tests/test_llama_cpp.py (4-12 min on 2 cores; LLAMA_CPP=0 skips it)"
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(INTEROP)/bin/python -m pip install --quiet -r interop/requirements-llama.txt && touch $@ \
	  || echo "qlab: llama-cpp-python did not build (it needs cmake >= 3.21 and a C++17 compiler); the llama.cpp tests will be skipped"

interop: $(INTEROP_STAMP) native $(if $(filter 1,$(LLAMA_CPP)),$(LLAMA_STAMP))
	PYTHONPATH=$(CURDIR) $(INTEROP)/bin/python -m pytest interop/tests -q -p no:cacheprovider

clean:
	rm -rf _build labs/release $(NATIVE)
