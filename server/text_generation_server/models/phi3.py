"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layout, with q/k/v fused in one checkpoint tensor
(`self_attn.qkv_proj`) and gate/up in another (`mlp.gate_up_proj`, gate rows first), LongRoPE
(`su`) scaling, partial rotary where the config has a partial_rotary_factor (Phi-4-mini), and
Phi-3-mini's sliding window on every layer.

The fused tensors are read as their parts (each rank reads its rows of each), so the layers,
the LoRA hook and tensor parallelism are the shared ones; a PEFT adapter on `qkv_proj` /
`gate_up_proj` is cut into the parts' pairs when it loads (`lora.adapter`)."""

from __future__ import annotations

from text_generation_server.models.common import MLP, Attention, CausalLM


class Phi3ForCausalLM(CausalLM):
    def make_attention(self, cfg, w, prefix, i, split, group):
        return Attention(cfg, w, prefix, i, split, group, self.rotary_of(cfg, i), fused_qkv=f"{prefix}.qkv_proj.weight")

    def make_mlp(self, cfg, w, prefix, i, split, group):
        return MLP(cfg, w, prefix, i, split, group, gate_up=f"{prefix}.gate_up_proj.weight")
