# syntax=docker/dockerfile:1
# Tessera's image, multi-stage:
#   chef, planner, builder   Rust: dependencies cooked in their own layer (cargo-chef), then the
#                            tessera wheel (both binaries + the shard package; pyproject.toml)
#   python-cuda, python-cpu  the venv, made by scripts/install-python.sh (the recipe make uses)
#   base-cpu, base-cuda      the venv on python:3.12-slim, or on the CUDA runtime image
#   runtime                  user, /data, ports, health check, entrypoint, over base-$VARIANT:
#                              docker build .                         (CUDA)
#                              docker build --build-arg VARIANT=cpu .  (CPU)
# docs/deploy.md says how to run it. CI lints this file (hadolint) and starts the launcher the
# way the runtime stages do (integration-tests/test_deploy.py); no image is built there.

ARG RUST_VERSION=1.95
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG VARIANT=cuda

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.73
WORKDIR /src

FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY launcher launcher
COPY router router
COPY proto proto
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=planner /src/recipe.json recipe.json
COPY proto proto
RUN cargo chef cook --release --recipe-path recipe.json
RUN python3 -m venv /build \
    && /build/bin/pip install --no-cache-dir "maturin>=1.5,<2" "grpcio-tools>=1.60"
COPY . .
# The same steps as `make proto` and `make wheel`.
RUN /build/bin/python server/build_proto.py \
    && /build/bin/maturin build --release --out /dist

FROM ${CUDA_IMAGE} AS python-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/install-python.sh /tmp/install-python.sh
COPY --from=builder /dist /dist
RUN /tmp/install-python.sh /opt/tessera cuda "$(ls /dist/tessera-*.whl)"

FROM ${PYTHON_IMAGE} AS python-cpu
COPY scripts/install-python.sh /tmp/install-python.sh
COPY --from=builder /dist /dist
RUN /tmp/install-python.sh /opt/tessera cpu "$(ls /dist/tessera-*.whl)"

# The runtime's base, by variant: the venv on slim Python, or on the CUDA runtime image with what
# FlashInfer's kernel compiler needs (nvcc and the CUDA headers, not the whole toolkit).
FROM ${PYTHON_IMAGE} AS base-cpu
COPY --from=python-cpu /opt/tessera /opt/tessera

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 cuda-nvcc-13-0 cuda-cudart-dev-13-0 cuda-cccl-13-0 \
       cuda-nvrtc-dev-13-0 libcublas-dev-13-0 libcurand-dev-13-0 ninja-build g++ \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true)
COPY --from=python-cuda /opt/tessera /opt/tessera
ENV PATH=/usr/local/cuda/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    FLASHINFER_WORKSPACE_BASE=/data \
    TRITON_CACHE_DIR=/data/triton

# base-${VARIANT} names one of the two stages above, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
RUN useradd --create-home --uid 1000 tessera \
    && mkdir -p /data && chown tessera /data
# Every launcher flag has an environment variable (--help lists them); these are the image's own.
ENV PATH=/opt/tessera/bin:$PATH \
    HF_HOME=/data \
    TESSERA_CACHE=/data/tessera \
    PORT=8080
VOLUME /data
EXPOSE 8080
USER 1000
WORKDIR /data
# The launcher listens on $HOSTNAME (Docker sets it to the container's name, as TGI expects).
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://%s:%s/health' % (os.environ.get('HOSTNAME') or '127.0.0.1', os.environ['PORT']), timeout=4)"]
ENTRYPOINT ["text-generation-launcher"]
