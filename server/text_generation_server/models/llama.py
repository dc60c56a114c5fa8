"""The Llama family: Llama 2/3 (incl. Llama-3 rope scaling), Mistral and Qwen2 configs.

Tokens of all sequences of a step are flattened into one ragged [T] batch; attention reads the
paged cache through the backend planned in the forward context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.layers.cpu_gemm import packed_linear
from text_generation_server.layers.linear import Linear
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.layers.ops import TorchOps, make_ops
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.models.config import ModelConfig
from text_generation_server.models.forward_context import get_forward_context
from text_generation_server.weights.loader import Weights


class Attention:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int):
        h, kvh, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.qkv_bias

        def weight(name: str, out: int, inp: int) -> torch.Tensor:
            return w.get(f"{prefix}.{name}.weight", (out, inp))

        def bias(name: str, out: int) -> torch.Tensor | None:
            return w.get(f"{prefix}.{name}.bias", (out,)) if qkv_bias else None

        names = ("q_proj", "k_proj", "v_proj")
        outs = (h * d, kvh * d, kvh * d)
        self.qkv_proj = Linear([weight(n, o, hid) for n, o in zip(names, outs)],
                               [bias(n, o) for n, o in zip(names, outs)], names, layer)
        self.o_proj = Linear([weight("o_proj", hid, h * d)], None, ("o_proj",), layer)
        self.layer, self.h, self.kvh, self.d = layer, h, kvh, d

    def __call__(self, x, positions, rotary: RotaryEmbedding, k_cache, v_cache, ops: TorchOps):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x)
        attention = get_forward_context().attention
        v = v.view(t, self.kvh, self.d)
        q, k = ops.rope_store(rotary, q.view(t, self.h, self.d), k.view(t, self.kvh, self.d), v, positions,
                              attention.slots, k_cache, v_cache)
        out = attention.forward(q, k, v, k_cache, v_cache)
        return self.o_proj(out.reshape(t, self.h * self.d))[0]


class MLP:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int):
        hid, inter = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = Linear([w.get(f"{prefix}.gate_proj.weight", (inter, hid)),
                                    w.get(f"{prefix}.up_proj.weight", (inter, hid))], None, ("gate_proj", "up_proj"), layer)
        self.down_proj = Linear([w.get(f"{prefix}.down_proj.weight", (hid, inter))], None, ("down_proj",), layer)

    def __call__(self, x, ops: TorchOps):
        gate, up = self.gate_up_proj(x)
        return self.down_proj(ops.silu_mul(gate, up))[0]


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, w: Weights, layer: int):
        p = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(w.get(f"{p}.input_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(
            w.get(f"{p}.post_attention_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps
        )
        self.self_attn = Attention(cfg, w, f"{p}.self_attn", layer)
        self.mlp = MLP(cfg, w, f"{p}.mlp", layer)


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, w: Weights):
        self.config = cfg
        self.device, self.dtype = w.device, w.dtype
        self.embed_tokens = w.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        self.layers = [DecoderLayer(cfg, w, i) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(w.get("model.norm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps)
        if cfg.tie_word_embeddings and not w.has("lm_head.weight"):
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = w.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, w.device, w.dtype)
        self.ops = make_ops(w.device)
        self._lm_head_cpu = packed_linear(self.lm_head)  # the CPU's packed GEMM, else None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_caches, v_caches) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden].

        The residual stream is carried beside each sublayer's output and added in the next norm
        (`add_rmsnorm`), so that on CUDA the add and the norm are one kernel."""
        ops = self.ops
        residual = F.embedding(input_ids, self.embed_tokens)
        x = None
        for i, layer in enumerate(self.layers):
            if x is None:
                h = layer.input_layernorm(residual, ops)
            else:
                h, residual = layer.input_layernorm.add(x, residual, ops)
            x = layer.self_attn(h, positions, self.rotary, k_caches[i], v_caches[i], ops)
            h, residual = layer.post_attention_layernorm.add(x, residual, ops)
            x = layer.mlp(h, ops)
        return self.norm.add(x, residual, ops)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] (written into `out` when given)."""
        logits = self._lm_head_cpu(hidden) if self._lm_head_cpu is not None else F.linear(hidden, self.lm_head)
        return logits.float() if out is None else out.copy_(logits)

