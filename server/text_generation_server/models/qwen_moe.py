"""Qwen3-MoE and Qwen2-MoE: Qwen's attention (Qwen3's q/k norms; Qwen2's q/k/v biases) with a
mixture of experts (`layers/moe.py`) as the MLP of every layer but the config's mlp_only_layers
(and those off its decoder_sparse_step), which keep a dense MLP. The top-k weights are
renormalised when norm_topk_prob says so. Qwen2-MoE adds a shared expert to every mixture, gated
by a sigmoid of its own projection."""

from __future__ import annotations

from text_generation_server.layers.moe import SparseMoe
from text_generation_server.models.common import MLP, CausalLM


class QwenMoeForCausalLM(CausalLM):
    def make_mlp(self, cfg, w, prefix, i, split, group):
        if not cfg.moe_layers[i]:  # LoRA on a mixture-of-experts model reaches attention only
            return MLP(cfg, w, prefix, i, split, group, lora=False)
        shared = gate = None
        if cfg.shared_expert_intermediate_size:
            size = cfg.shared_expert_intermediate_size
            shared = MLP(cfg, w, f"{prefix}.shared_expert", i, split, group, size=size, share=split.share(size), lora=False)
            gate = f"{prefix}.shared_expert_gate.weight"
        inter = cfg.moe_intermediate_size
        return SparseMoe(w, f"{prefix}.gate.weight",
                         lambda e: tuple(f"{prefix}.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")),
                         cfg.num_experts, cfg.hidden_size, inter, split.share(inter), cfg.experts_per_token,
                         cfg.norm_topk_prob, cfg.hidden_act, group, shared, gate)


class Qwen3MoeForCausalLM(QwenMoeForCausalLM):
    pass


class Qwen2MoeForCausalLM(QwenMoeForCausalLM):
    pass
