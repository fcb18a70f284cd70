# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch that lies on this machine's disk. Elsewhere: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
GLUE_DIR ?= $(abspath ../shared/data/glue)
BIN = $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test test-fast benchmark tradeoff clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The main job on the offline defaults: the full DPBERT pipeline on RTE with the packaged MiniLM.
demo: install
	$(BIN)/dpbert-rl pipeline --task rte --data-dir $(GLUE_DIR) --output-dir runs/demo-rte \
		--stage1-epochs 3 --stage2-epochs 1 --lr 1e-4 --target-rate 0.35 --lam 1 --cost 0.05 --dual-lr 0.02 \
		--evals-per-epoch 3

# -rs: every skipped test is listed with its reason (with GLUE_DIR set, missing GLUE files fail, not skip)
test: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not integration"

# The 12-layer all-mpnet-base-v2 behind `--backbone mpnet-base` (about 400 MB from PyPI; not part of install or
# test). Its real check: DPBERT_RL_TEST_MPNET=1 $(BIN)/python -m pytest -q -m mpnet
.PHONY: mpnet
mpnet: install
	$(BIN)/pip install --quiet -e ".[mpnet]"

benchmark: install
	$(BIN)/python benchmarks/pipeline.py --data-dir $(GLUE_DIR)

# DPBERT against the early-exit baselines: Fig. 3, Tables 1-3, Fig. 4 and the oracle. One run from one code
# commit: every task and method one after another at a fixed thread count (about 5.5 h on 2 cores; add
# TRADEOFF_ARGS=--plan for the estimate). Re-running resumes where it stopped.
TRADEOFF_THREADS ?= 2
TRADEOFF_ARGS ?=
tradeoff: install
	OMP_NUM_THREADS=$(TRADEOFF_THREADS) MKL_NUM_THREADS=$(TRADEOFF_THREADS) $(BIN)/python benchmarks/tradeoff.py \
		--data-dir $(GLUE_DIR) --threads $(TRADEOFF_THREADS) $(TRADEOFF_ARGS)

clean:
	rm -rf runs .pytest_cache
