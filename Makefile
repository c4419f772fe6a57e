# One virtual environment at .venv, used by every target.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test smoke test-slow test-gpu gpu-site gpu-check gpu-check-models bench compare clean

# torch is pinned to 2.13.0 in pyproject.toml: on this machine that is the local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job (README's first command): real SmolLM2-135M -> hybrid Hedgehog on general English, ~29 min on 2 cores.
demo: $(STAMP)
	$(BIN)/hedgehog convert --out runs/smollm2-hedgehog

test: $(STAMP)
	$(BIN)/python -m pytest

# The main job on the real SmolLM2 at a tiny budget (fetch, convert, both stages, save, reload, report,
# generate) under a peak-memory bound; 3 to 8 minutes. CI runs it after the unit tests.
smoke: $(STAMP)
	$(BIN)/python -m pytest -m smoke -s

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The GPU tests (skipped by `make test` without CUDA). Runs with this repo's .venv where there is one, else the
# machine's python3 with PYTHONPATH=src (and .site, where fla-core can be installed: see README); < 5 min.
GPU_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
test-gpu:
	PYTHONPATH=src:.site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m pytest -m gpu -p no:cacheprovider

# The one prepared check for a lent GPU (#37): fla from .whl/ where carried, the GPU tests, then the attention
# benchmark on CUDA in bf16 (hybrid, linear and the default model's hybrid with its sparse cache against SDPA,
# forward and backward, peak memory) and the from-scratch training step under bf16 autocast, into GPU_OUT.
# gpu-check-models (a second call: one device command may run 10 minutes) measures, on a model of SmolLM2's shape
# with random weights (the lent machine cannot reach the package registry for the real one), the conversion's
# stage 1 / stage 2 tokens/s, the whole-model prefill and the decode throughput at 16k context at equal memory
# against softmax + KV cache.
GPU_OUT ?= $(if $(OUT),$(OUT),bench_out/gpu)
GPU_RUN := PYTHONPATH=src:.site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY)
gpu-site:
	if [ -d .whl ] && [ ! -d .site/fla ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --target .site .whl/*.whl; fi

gpu-check: gpu-site
	$(MAKE) test-gpu
	$(GPU_RUN) -m hedgehog bench attention --device cuda --dtype bf16 --attention hybrid --repeats 3 \
		--lengths 2048,8192,32768,65536 --max-sdpa-len 65536 --out $(GPU_OUT)/attention-hybrid
	$(GPU_RUN) -m hedgehog bench attention --device cuda --dtype bf16 --attention linear --repeats 3 \
		--lengths 2048,8192,32768,65536 --max-sdpa-len 65536 --out $(GPU_OUT)/attention-linear
	$(GPU_RUN) -m hedgehog bench attention --device cuda --dtype bf16 --attention hybrid --sparse-cache 128 \
		--repeats 2 --lengths 2048,8192,32768 --out $(GPU_OUT)/attention-sparse-cache
	$(GPU_RUN) -m hedgehog bench train-step --device cuda --mixed-precision bf16 --lengths 1024,4096 \
		--tokens 65536 --mimic-rows 64 --repeats 3 --out $(GPU_OUT)/train-step

gpu-check-models: gpu-site
	$(GPU_RUN) -m hedgehog bench stages --device cuda --batches 4 --out $(GPU_OUT)/stages
	$(GPU_RUN) -m hedgehog bench prefill --model smollm2-shape --device cuda --dtype bf16 --repeats 2 \
		--lengths 2048,16384,32768 --sparse-cache 0,128 --out $(GPU_OUT)/prefill
	$(GPU_RUN) -m hedgehog bench decode --model smollm2-shape --device cuda --dtype bf16 --contexts 16384 \
		--steps 8 --memory-gb 40 --max-batch 512 --out $(GPU_OUT)/decode

bench: $(STAMP)
	$(BIN)/hedgehog bench attention --out bench_out/attention

# Every feature map through the same pipeline and budget (about 7 x the default job; pass ARGS to shrink).
compare: $(STAMP)
	$(BIN)/hedgehog compare --out runs/compare $(ARGS)

clean:
	rm -rf $(VENV) bench_out runs .pytest_cache
