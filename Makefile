# Tessera: `make run` installs everything and serves the default model; `make test` runs all tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-v2
STUBS := server/text_generation_server/pb/generate_pb2.py
HELM := .cache/bin/helm
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test test-rust test-python test-integration test-gpu build proto model wheel clean

install: $(STAMP) $(STUBS) build

# The venv is cached in the repo (ignored by git); the stamp changes when the requirements do.
# scripts/install-python.sh is the one recipe, shared with the Dockerfile.
$(STAMP): server/pyproject.toml pyproject.toml scripts/install-python.sh
	scripts/install-python.sh $(VENV) dev
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

# helm, for the chart's tests: built from the Go module proxy once, cached in .cache/bin.
$(HELM):
	GOBIN=$(CURDIR)/.cache/bin go install helm.sh/helm/v3/cmd/helm@v3.17.3

test-integration: install model $(HELM)
	$(PY) -m pytest -q integration-tests

# On a CUDA machine with flashinfer installed: FlashInfer vs torch, CUDA graphs vs eager, model vs transformers.
# PY=python3 uses the machine's own torch (the GPU device has no venv).
test-gpu:
	cd server && $(PY) -m pytest -q tests_gpu

clean:
	rm -rf $(VENV) target dist server/text_generation_server/pb
