# `make demo`: set up (first time) and run the demo; `make test`: set up and run the tests.
# Setup picks the CPU build of torch when no NVIDIA GPU is present: an unpinned torch would
# pull gigabytes of CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q $(TORCH); \
	else \
		$(PY) -m pip install -q --retries 0 --timeout 10 $(TORCH) --index-url https://download.pytorch.org/whl/cpu \
		|| $(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/lorafleet demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check lorafleet tests
	$(VENV)/bin/ruff format --check lorafleet tests
