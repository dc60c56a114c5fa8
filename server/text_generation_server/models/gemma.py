"""Gemma 2 and Gemma 3 (text): what sets them apart from Llama is

- the embedding scaled by sqrt(hidden) and tied to the LM head;
- RMSNorms scaled by (1 + weight) in float32 (`RMSNorm(gemma=True)`);
- four norms per layer: the attention and MLP outputs are normed again before their residual add;
- GELU (tanh) gating in the MLP;
- attention scaled by query_pre_attn_scalar^-0.5, not head_dim^-0.5;
- sliding-window and global layers alternating (Gemma 2: every other layer; Gemma 3: five local
  to one global), each kind with its own window (`ModelConfig.layer_windows`) and, in Gemma 3,
  its own rotary base (`rope_local`);
- Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap));
- Gemma 3: q/k norms per head, like Qwen3 but Gemma-style.
"""

from __future__ import annotations

from text_generation_server.layers.norm import RMSNorm
from text_generation_server.models.common import Attention, CausalLM
from text_generation_server.layers.ops import TorchOps


class GemmaLayer:
    def __init__(self, norms: list[RMSNorm], self_attn: Attention, mlp):
        self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm, \
            self.post_feedforward_layernorm = norms
        self.self_attn, self.mlp = self_attn, mlp

    def __call__(self, x, residual, positions, k_cache, v_cache, ops: TorchOps):
        if x is None:
            h = self.input_layernorm(residual, ops)
        else:
            h, residual = self.input_layernorm.add(x, residual, ops)
        x = self.post_attention_layernorm(self.self_attn(h, positions, k_cache, v_cache, ops), ops)
        h, residual = self.pre_feedforward_layernorm.add(x, residual, ops)
        return self.post_feedforward_layernorm(self.mlp(h, ops), ops), residual


class GemmaForCausalLM(CausalLM):
    gemma = True

    def make_layer(self, cfg, w, i, split, group):
        p = f"{self.prefix}.layers.{i}"
        norms = [self.norm_of(cfg, w, f"{p}.{n}") for n in ("input_layernorm", "post_attention_layernorm",
                                                            "pre_feedforward_layernorm", "post_feedforward_layernorm")]
        return GemmaLayer(norms, self.make_attention(cfg, w, f"{p}.self_attn", i, split, group),
                          self.make_mlp(cfg, w, f"{p}.mlp", i, split, group))


class Gemma2ForCausalLM(GemmaForCausalLM):
    """Soft-capping comes from the config (attn_logit_softcapping, final_logit_softcapping)."""


class Gemma3ForCausalLM(GemmaForCausalLM):
    """q/k norms (`qk_norm`) and the local rotary base come from the config. Also the text model
    of Gemma3ForConditionalGeneration checkpoints (4B and up), whose decoder sits under
    `language_model.model` (`model.language_model` as transformers 5 names it); their image
    encoder is not read."""

    prefixes = ("model", "language_model.model", "model.language_model")
