"""Attention backends. `flashinfer` is imported only inside its own module, on CUDA."""

from __future__ import annotations

from text_generation_server.attention.base import AttentionBackend, AttentionInputs


def make_backend(device_type: str, **kwargs) -> AttentionBackend:
    """The backend for a device: torch reference on CPU (FlashInfer on CUDA arrives with the CUDA path)."""
    from text_generation_server.attention.torch_ref import TorchAttention

    return TorchAttention(**kwargs)


__all__ = ["AttentionBackend", "AttentionInputs", "make_backend"]
