"""Every environment variable the shard reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live: $TESSERA_CACHE, else $XDG_CACHE_HOME/tessera, else ~/.cache/tessera."""
    if v := os.environ.get("TESSERA_CACHE"):
        return Path(v)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tessera"


def cpu_kv_cache_bytes() -> int:
    """KV cache budget on CPU (TESSERA_CPU_KV_CACHE_MB, default 512 MiB)."""
    raw = os.environ.get("TESSERA_CPU_KV_CACHE_MB", "512")
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"TESSERA_CPU_KV_CACHE_MB must be an integer, got {raw!r}") from None
    if mb <= 0:
        raise ValueError(f"TESSERA_CPU_KV_CACHE_MB must be positive, got {mb}")
    return mb * 1024 * 1024


def log_level() -> str:
    return os.environ.get("LOG_LEVEL", "INFO").upper()


def log_json() -> bool:
    """Log JSON records, one per line (TESSERA_LOG_FORMAT=json; the launcher sets it and re-emits
    each record at its level)."""
    return os.environ.get("TESSERA_LOG_FORMAT", "text") == "json"


def launch_token() -> str:
    """The token of the launch that started this shard (TESSERA_LAUNCH_TOKEN), reported in Info so
    that the launcher and the router can tell their own shards from another instance's."""
    return os.environ.get("TESSERA_LAUNCH_TOKEN", "")


def segment_gemm_backend() -> str:
    """FlashInfer segment-GEMM backend for LoRA on CUDA with TESSERA_LORA_KERNEL=segment: auto | sm80 |
    sm90 (TESSERA_SEGMENT_GEMM)."""
    v = os.environ.get("TESSERA_SEGMENT_GEMM", "auto")
    if v not in ("auto", "sm80", "sm90"):
        raise ValueError(f"TESSERA_SEGMENT_GEMM must be auto, sm80 or sm90, got {v!r}")
    return v


def layer_ops() -> str:
    """Element-wise layer kernels on CUDA (TESSERA_LAYER_OPS): fused (FlashInfer's RMSNorm, rotary,
    SiLU-and-multiply; default) or torch (the reference, as on CPU)."""
    v = os.environ.get("TESSERA_LAYER_OPS", "fused")
    if v not in ("fused", "torch"):
        raise ValueError(f"TESSERA_LAYER_OPS must be fused or torch, got {v!r}")
    return v


def lora_kernel() -> str:
    """LoRA kernels on CUDA (TESSERA_LORA_KERNEL): triton (our grouped kernels, default) or segment
    (FlashInfer's segment GEMM over rows sorted by adapter)."""
    v = os.environ.get("TESSERA_LORA_KERNEL", "triton")
    if v not in ("triton", "segment"):
        raise ValueError(f"TESSERA_LORA_KERNEL must be triton or segment, got {v!r}")
    return v


def overlap(device_type: str) -> bool:
    """Overlapped steps (TESSERA_OVERLAP=1/0): the next decode step of a batch is launched before
    the current one's results are returned, so the GPU never waits for the host or the router.
    Default: on for CUDA; off on CPU, where a launch is the whole computation and would only delay
    each answer by a step."""
    v = os.environ.get("TESSERA_OVERLAP", "")
    if v not in ("", "0", "1"):
        raise ValueError(f"TESSERA_OVERLAP must be 0 or 1, got {v!r}")
    return device_type == "cuda" if v == "" else v == "1"


def collective_timeout() -> float:
    """Seconds a tensor-parallel collective may wait for the other ranks before it fails
    (TESSERA_COLLECTIVE_TIMEOUT, default 120): a rank that failed or hangs alone then fails the
    step on every rank instead of hanging them."""
    return float(os.environ.get("TESSERA_COLLECTIVE_TIMEOUT", "120"))
