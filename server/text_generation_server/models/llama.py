"""The Llama family: Llama 2/3 (incl. Llama-3 rope scaling), Mistral (a sliding window on every
layer) and Qwen2 (biases on q/k/v): the shared layers as they are (`common.py`)."""

from __future__ import annotations

from text_generation_server.models.common import MLP, Attention, CausalLM

__all__ = ["Attention", "LlamaForCausalLM", "MLP"]


class LlamaForCausalLM(CausalLM):
    """x + attn(norm(x)), then x + mlp(norm(x)), with SiLU-gated MLPs."""
