# Quick start targets (see README). PYTHON can point at a virtual environment's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# A CPU build of torch when none is installed; an existing (e.g. CUDA) torch is kept as it is.
TORCH_CPU ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install demo test test-quick test-fault

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)"
	$(PIP) install "$(DEEPSPEED)" -e ".[test]"

# The main job on the built-in corpus, on a machine without a GPU: a contrastive stage 1 on joined pairs, stage 2
# from it, then evaluation on the world's held-out images (the recipe of BENCHMARKS.md's learnability section;
# under 10 minutes on 2 cores). DATA picks another world (make demo DATA=synthetic:seed=7331).
# tests/test_learnability.py trains this recipe.
DATA ?= synthetic
DEMO = --model tiny --data $(DATA) --micro_batch 32 --resume none --save_every 500
demo: install
	$(PYTHON) -m mvptr_ds.run --stage 1 --objectives vsc --join_pairs 0.5 --max_steps 1500 --lr 3e-4 --warmup_steps 40 \
		--output_dir runs/demo_stage1 $(DEMO)
	$(PYTHON) -m mvptr_ds.run --stage 2 --objectives vsc,itm,wpg --itm_negatives sampled --itm_prior \
		--wpg_negative_encoding shared --wpg_negatives sampled --loss_weights wpg=4 --max_steps 600 --lr 3e-4 \
		--warmup_steps 40 --output_dir runs/demo_stage2 --init_from runs/demo_stage1/final $(DEMO)
	$(PYTHON) -m mvptr_ds.run evaluate --checkpoint runs/demo_stage2/final --output runs/demo_stage2/eval.json

test: install
	$(PYTHON) -m pytest -q tests

# The fast unit tests only (a few minutes): no launcher runs (slow), no fault injection (fault).
test-quick: install
	$(PYTHON) -m pytest -q -m "not slow and not fault" tests

test-fault: install
	$(PYTHON) -m pytest -q -m fault tests
