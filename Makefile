# Two commands: `make demo` (the main job) and `make test`. Both build .venv first.
# The demo needs only the Piper path; the tests also install the XTTS extra (torch, coqui-tts).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt
# The Rust client's tests build with Debian's toolchain, which `rust-deps` installs
# (scripts/install-rust-deps.sh), whatever else is on PATH. The web page's test drives
# Debian's headless Chromium through its chromedriver, which `browser-deps` installs
# (scripts/install-browser.sh).

.PHONY: setup demo test bench rust-deps browser-deps clean

$(VENV)/.base: pyproject.toml constraints.txt
	@echo "[setup] creating $(VENV) and installing the Piper path (piper-tts, onnxruntime, pyzmq …)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) --progress-bar on -e .
	touch $@

$(VENV)/.full: $(VENV)/.base
	@echo "[setup] installing the XTTS extra (torch, coqui-tts: the largest download), tests and benchmark tools"
	$(PIP) --progress-bar on -e '.[test,xtts,bench]'
	touch $@

rust-deps:
	sh scripts/install-rust-deps.sh

browser-deps:
	sh scripts/install-browser.sh

setup: $(VENV)/.full

demo: $(VENV)/.base
	$(VENV)/bin/tts-broker demo

test: $(VENV)/.full rust-deps browser-deps
	$(PY) -m pytest

# The peers the benchmark runs side by side (wyoming-piper in its own venv, the same voice).
.venv-peers/wyoming-piper/.built: $(VENV)/.full
	$(PY) -m bench.peer_env

bench: $(VENV)/.full .venv-peers/wyoming-piper/.built rust-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-peers out
