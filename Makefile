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

.PHONY: book test release clean venv native

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

book: $(STAMP) native release
	$(VENV)/bin/jupyter-book build . --builder html --warningiserror --keep-going
	@echo "Book built: _build/html/index.html"

test: $(STAMP) native
	$(PY) -m pytest

clean:
	rm -rf _build labs/release $(NATIVE)
