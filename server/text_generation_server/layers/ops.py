"""The element-wise parts of a decoder layer, one implementation per device type.

`TorchOps` is the reference and the CPU path: plain torch, as the layers always computed them.
On CUDA with FlashInfer, `layers/flashinfer_ops.FlashInferOps` does each in one kernel (residual
add fused into RMSNorm, SiLU-and-multiply) and rotary embedding with the KV-cache write in one
Triton kernel of ours (`layers/rope_store.py`), which is what keeps a decode step to about a dozen
kernels per layer. `TESSERA_LAYER_OPS=torch` forces the
reference on CUDA (benchmarks, parity tests).
"""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from text_generation_server import env
from text_generation_server.attention.base import write_kv

if TYPE_CHECKING:
    from text_generation_server.layers.rotary import RotaryEmbedding

log = logging.getLogger(__name__)


class TorchOps:
    name = "torch"

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [T, hidden]; computed in float32 like the reference implementation."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(residual + x), residual + x): the residual stream and the next sublayer's input."""
        residual = residual + x
        return self.rmsnorm(residual, weight, eps), residual

    def gemma_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Gemma's RMSNorm: scaled by (1 + weight), all in float32, then cast."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * (1.0 + weight.float())).to(x.dtype)

    def gemma_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self.gemma_rmsnorm(residual, weight, eps), residual

    def rope(self, rotary: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, dim], k: [T, kv_heads, dim] (views of the fused q/k/v output allowed)."""
        return rotary.apply(q, k, positions)

    def rope_store(self, rotary: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor, cache_locs: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding, then the new keys and values into the paged cache at `cache_locs`: returns
        the rotated q and k. v: [T, kv_heads, dim]; caches: [num_blocks, block_size, kv_heads, dim]."""
        q, k = self.rope(rotary, q, k, positions)
        write_kv(k, v, k_cache, v_cache, cache_locs)
        return q, k

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") * up

    def act_mul(self, act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up for a config's `hidden_act`."""
        return self.silu_mul(gate, up) if act == "silu" else self.gelu_tanh_mul(gate, up)


def joined(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate | up as one [T, 2n] tensor (for kernels that take them joined): a view where `up` lies
    right after `gate` in one buffer (the fused gate/up GEMM's output), else a copy (LoRA made new
    ones). Two allocations may lie side by side without being one buffer: those are copied too."""
    n = gate.shape[-1]
    adjacent = (gate.stride() == up.stride() and gate.stride(-1) == 1 and up.shape == gate.shape
                and up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()
                and up.data_ptr() == gate.data_ptr() + n * gate.element_size())
    return gate.as_strided((gate.shape[0], 2 * n), gate.stride()) if adjacent else torch.cat([gate, up], dim=-1)


def make_ops(device: torch.device) -> TorchOps:
    """FlashInfer's kernels on CUDA when installed (unless TESSERA_LAYER_OPS=torch), else the reference."""
    if device.type == "cuda" and env.layer_ops() == "fused":
        try:
            from text_generation_server.layers.flashinfer_ops import FlashInferOps
        except ImportError as e:
            log.warning("fused layer ops unavailable (%s): using the torch reference", e)
        else:
            return FlashInferOps()
    return TorchOps()
