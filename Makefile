# make setup: one .venv with everything (CPU torch 2.13.0, onnx, onnxscript, onnxruntime CPU).
# It is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest

.PHONY: setup test test-slow test-all demo bench eval clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,export,hub,remote,dev,serve,serve-ray,eval]'
	touch $@

# The quick suite (< 20 min on 2 cores). CI also runs `make test-slow`. Every test target first
# installs the front ends the tests drive (genai and optimum venvs, Node packages, chromium: cached,
# so only the first run installs), so a clone's `make setup && make test` skips nothing but `cuda`.
test: setup setup-frontends
	$(PYTEST) -q -m "not slow"

test-slow: setup setup-frontends
	$(PYTEST) -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected

test-all: setup setup-frontends
	$(PYTEST) -q

# The embedded Shakespeare model, end to end and offline: export with the parity gate (the table
# is printed), then generate with ONNX Runtime alone.
DEMO_OUT := artifacts/shakespeare-arith-fp32
DEMO_PROMPT ?= ROMEO:
demo: setup
	$(BIN)/python -m export build --code arith --out $(DEMO_OUT) --force
	@echo "---- python -m runtime generate --model $(DEMO_OUT) --prompt '$(DEMO_PROMPT)' (greedy)"
	$(BIN)/python -m runtime generate --model $(DEMO_OUT) --prompt "$(DEMO_PROMPT)" --max-new-tokens 120
	@echo "---- sampled (temperature 0.8, top-k 50, seed 1)"
	$(BIN)/python -m runtime generate --model $(DEMO_OUT) --prompt "$(DEMO_PROMPT)" --max-new-tokens 200 \
		--temperature 0.8 --top-k 50 --seed 1

bench: setup
	$(BIN)/python benchmarks/bench.py

# lm-eval on the offline tasks (evaluation/tasks): the demo artifact's scores, then the table-free model
# against its learned-table twin trained with the same recipe (benchmarks/compare.py --eval; the twins'
# training needs TABLEFREE_DATA, see benchmarks/RESULTS.md), accuracy, perplexity, size, RSS, speed.
EVAL_TASKS := tablefree_mc tablefree_cloze tablefree_ppl tablefree_gen
eval: setup
	test -f $(DEMO_OUT)/manifest.json || $(BIN)/python -m export build --code arith --out $(DEMO_OUT)
	$(BIN)/python -m evaluation --model tablefree-onnx --model_args path=$(DEMO_OUT) --tasks $(EVAL_TASKS)
	$(BIN)/python benchmarks/compare.py --eval --twins --json benchmarks/results/twins_eval.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Front ends that conflict with the main venv get venvs of their own (tests/frontends/shared.py finds
# them there; a missing one skips locally and fails under CI). Idempotent: redone when this file changes.
VENVS ?= .venvs
GENAI_PINS := onnxruntime-genai==0.18.0 onnxruntime==1.32.0 tokenizers==0.23.3 numpy==2.4.6
# torch first, pinned to the CPU build, or optimum pulls the CUDA one; optimum-onnx 0.1 needs transformers<4.58
OPTIMUM_PINS := 'optimum-onnx[onnxruntime]==0.1.0' optimum==2.1.0 transformers==4.57.6 onnxruntime==1.32.0 \
	tokenizers==0.22.2 numpy==2.4.6

.PHONY: setup-genai setup-optimum setup-frontends setup-cudaprobe

# The CPU peers of `make bench-peers` (benchmarks/peers.py): llama.cpp through llama-cpp-python compiled
# from its source distribution for this CPU (GGML_NATIVE; about 20 minutes on 2 cores, once: pip keeps
# the built wheel in its cache), OpenVINO, and gguf to write the checkpoint for llama.cpp; torch (CPU
# build) because the GGUF writer and the logits check run the reference.
PEERS_PINS := torch==2.13.0 gguf==0.19.0 openvino==2026.4.1 tokenizers==0.23.3 numpy==2.4.6
LLAMA_CPP_PIN := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: setup-peers bench-peers

setup-peers: $(VENVS)/peers/.installed

$(VENVS)/peers/.installed: Makefile
	test -x $(VENVS)/peers/bin/python || $(PYTHON) -m venv $(VENVS)/peers
	$(VENVS)/peers/bin/python -m pip install -q --upgrade pip
	$(VENVS)/peers/bin/python -m pip install -q $(PEERS_PINS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 nice $(VENVS)/peers/bin/python -m pip install -q \
		--no-binary llama-cpp-python $(LLAMA_CPP_PIN)
	touch $@

# Same weights in llama.cpp, OpenVINO, torch.compile and onnxruntime-genai beside the runtime (about
# 30 minutes on 2 cores: 3 interleaved rounds; the GGUF files are written once under benchmarks/cache).
bench-peers: setup setup-peers setup-genai
	$(BIN)/python benchmarks/peers.py

setup-genai: $(VENVS)/genai/.installed
setup-optimum: $(VENVS)/optimum/.installed
setup-cudaprobe: $(VENVS)/cudaprobe/.installed
setup-frontends: setup-genai setup-optimum setup-js setup-cudaprobe

# onnxruntime-gpu's partitioner without a GPU (tests/cuda_probe): the newest onnxruntime-gpu on the
# registry with its CUDA 13 libraries (about 2.5 GB), and build.sh's stand-in device. The CPU
# onnxruntime pin has no GPU wheel of its own version; this is the build a CUDA user installs.
CUDAPROBE_PINS := 'onnxruntime-gpu[cuda,cudnn]==1.31.1' 'nvidia-cublas~=13.0' numpy==2.4.6
$(VENVS)/cudaprobe/.installed: Makefile tests/cuda_probe/build.sh tests/cuda_probe/fake_cudart.c
	test -x $(VENVS)/cudaprobe/bin/python || $(PYTHON) -m venv $(VENVS)/cudaprobe
	$(VENVS)/cudaprobe/bin/python -m pip install -q --upgrade pip
	$(VENVS)/cudaprobe/bin/python -m pip install -q $(CUDAPROBE_PINS)
	tests/cuda_probe/build.sh $(VENVS)/cudaprobe
	touch $@

$(VENVS)/genai/.installed: Makefile
	test -x $(VENVS)/genai/bin/python || $(PYTHON) -m venv $(VENVS)/genai
	$(VENVS)/genai/bin/python -m pip install -q --upgrade pip
	$(VENVS)/genai/bin/python -m pip install -q $(GENAI_PINS)
	touch $@

$(VENVS)/optimum/.installed: Makefile
	test -x $(VENVS)/optimum/bin/python || $(PYTHON) -m venv $(VENVS)/optimum
	$(VENVS)/optimum/bin/python -m pip install -q --upgrade pip
	$(VENVS)/optimum/bin/python -m pip install -q torch==2.13.0
	$(VENVS)/optimum/bin/python -m pip install -q $(OPTIMUM_PINS)
	touch $@

# The JavaScript front ends' tools (tests/test_frontend_js.py, tests/test_web.py, `python -m runtime
# web`): Node with npm and Debian's chromium from apt when missing, then the npm packages pinned by
# tests/js/package-lock.json. ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's postinstall would
# fetch GPU binaries from a host we cannot reach (the CPU binary ships in the package);
# PUPPETEER_SKIP_DOWNLOAD: puppeteer-core drives the system chromium and downloads no browser.
APT_JS := $(if $(shell command -v node),,nodejs) $(if $(shell command -v npm),,npm) $(if $(shell command -v chromium),,chromium)
.PHONY: setup-js
setup-js: tests/js/node_modules/.installed

tests/js/node_modules/.installed: tests/js/package-lock.json
	@if [ -n "$(strip $(APT_JS))" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y $(APT_JS); fi
	cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund
	touch $@
