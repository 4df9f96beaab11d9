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

.PHONY: book test release clean venv

venv: $(STAMP)

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

book: $(STAMP) release
	$(VENV)/bin/jupyter-book build . --builder html --warningiserror --keep-going
	@echo "Book built: _build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf _build labs/release
