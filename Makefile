# Two commands: `make demo` (the main job) and `make test`. Both build .venv first.
# The demo needs only the Piper path; the tests also install the XTTS extra (torch, coqui-tts).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# rustup installs cargo here; the Rust client's interop test needs it.
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup demo test bench rust-deps clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.full: $(VENV)/.base
	$(PIP) -e '.[test,xtts,bench]'
	touch $@

rust-deps:
	sh scripts/install-rust-deps.sh

setup: $(VENV)/.full

demo: $(VENV)/.base
	$(VENV)/bin/tts-broker demo

test: $(VENV)/.full rust-deps
	$(PY) -m pytest

# The peers the benchmark runs side by side (wyoming-piper in its own venv, the same voice).
.venv-peers/wyoming-piper/.built: $(VENV)/.full
	$(PY) -m bench.peer_env

bench: $(VENV)/.full .venv-peers/wyoming-piper/.built
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-peers out
