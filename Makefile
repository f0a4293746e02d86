# Two commands: `make demo` (the main job) and `make test`. Both build .venv first.
# The demo needs only the Piper path; the tests also install the XTTS extra (torch, coqui-tts).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt

.PHONY: setup demo test clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.full: $(VENV)/.base
	$(PIP) -e '.[test,xtts]'
	touch $@

setup: $(VENV)/.full

demo: $(VENV)/.base
	$(VENV)/bin/tts-broker demo

test: $(VENV)/.full
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out
