# Set-up and entry points. Every install goes through constraints.txt (exact pins;
# torch==2.13.0 is the CPU wheel, an open range would pull a multi-GB CUDA build).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) setuptools torch triton numpy sympy transformers hypothesis pytest safetensors tqdm
	$(PIP) --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis fairy2i_compile.egg-info
