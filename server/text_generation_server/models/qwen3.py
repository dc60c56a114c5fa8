"""Qwen3 (dense): Llama's layout with an RMSNorm over each query and key head before the rotary
embedding (`ModelConfig.qk_norm`), no q/k/v biases, and a head_dim of its own (128 whatever the
hidden size)."""

from __future__ import annotations

from text_generation_server.models.common import CausalLM


class Qwen3ForCausalLM(CausalLM):
    """The q/k norms are switched on by the config (`qk_norm`, set for model_type qwen3)."""
