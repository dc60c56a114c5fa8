"""Attention backends. `flashinfer` is imported only inside its own module, on CUDA."""

from __future__ import annotations

import torch

from text_generation_server.attention.base import AttentionBackend, AttentionInputs


def make_backend(device: torch.device, dtype: torch.dtype, name: str | None = None, **kwargs) -> AttentionBackend:
    """The backend for a device: FlashInfer on CUDA (when installed), the torch reference elsewhere.
    `name` forces one ("torch" or "flashinfer")."""
    if name is None:
        name = "flashinfer" if device.type == "cuda" and _has_flashinfer() else "torch"
    if name == "flashinfer":
        from text_generation_server.attention.flashinfer import FlashInferAttention

        return FlashInferAttention(device=device, dtype=dtype, **kwargs)
    if name != "torch":
        raise ValueError(f"attention backend must be 'torch' or 'flashinfer', got {name!r}")
    from text_generation_server.attention.torch_ref import TorchAttention

    return TorchAttention(**kwargs)


def _has_flashinfer() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


__all__ = ["AttentionBackend", "AttentionInputs", "make_backend"]
