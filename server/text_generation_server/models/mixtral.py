"""Mixtral: Mistral's attention with a mixture of experts for every MLP (`layers/moe.py`): 8
experts of SiLU-gated MLPs (w1 gate, w3 up, w2 down) under `block_sparse_moe`, the top 2 per
token, their softmax weights always renormalised."""

from __future__ import annotations

from text_generation_server.layers.moe import SparseMoe
from text_generation_server.models.common import CausalLM


class MixtralForCausalLM(CausalLM):
    def make_mlp(self, cfg, w, prefix, i, split, group):
        p = prefix.removesuffix(".mlp") + ".block_sparse_moe"
        inter = cfg.moe_intermediate_size
        return SparseMoe(w, f"{p}.gate.weight", lambda e: tuple(f"{p}.experts.{e}.{n}.weight" for n in ("w1", "w3", "w2")),
                         cfg.num_experts, cfg.hidden_size, inter, split.share(inter), cfg.experts_per_token,
                         True, cfg.hidden_act, group)
