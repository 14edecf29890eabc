# Quick start targets (see README). PYTHON can point at a virtual environment's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# A CPU build of torch when none is installed; an existing (e.g. CUDA) torch is kept as it is.
TORCH_CPU ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install demo test test-fault bench-cpu

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)"
	$(PIP) install "$(DEEPSPEED)" -e ".[test]"

# The main job on the built-in corpus, on a machine without a GPU: stage 1, then stage 2 from it.
demo: install
	$(PYTHON) -m mvptr_ds.run --stage 1 --model tiny --max_steps 150 --output_dir runs/demo_stage1 --resume none
	$(PYTHON) -m mvptr_ds.run --stage 2 --model tiny --max_steps 300 --output_dir runs/demo_stage2 --resume none \
		--init_from runs/demo_stage1/final

test: install
	$(PYTHON) -m pytest -q tests

test-fault: install
	$(PYTHON) -m pytest -q -m fault tests
