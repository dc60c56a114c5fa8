"""The Llama family: Llama 2/3 (incl. Llama-3 rope scaling), Mistral and Qwen2 configs.

Tokens of all sequences of a step are flattened into one ragged [T] batch; attention reads the
paged cache through the backend planned in the forward context. Under tensor parallelism each
rank holds its share (`parallel.Split`) and the row-parallel outputs, the embedding and the
logits go through the group's collectives; at world size 1 there are none.
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
from text_generation_server.parallel import SINGLE, Group, Split
from text_generation_server.weights.loader import Weights


class Attention:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, split: Split, group: Group):
        h, kvh, d, hid = split.heads, split.kv_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.qkv_bias
        whole = split.world == 1

        def weight(name: str, full_out: int) -> torch.Tensor:
            return w.get(f"{prefix}.{name}.weight", (full_out, hid), rows=None if whole else split.out_rows(name))

        def bias(name: str, full_out: int) -> torch.Tensor | None:
            if not qkv_bias:
                return None
            return w.get(f"{prefix}.{name}.bias", (full_out,), rows=None if whole else split.out_rows(name))

        names = ("q_proj", "k_proj", "v_proj")
        full = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.qkv_proj = Linear([weight(n, o) for n, o in zip(names, full)], [bias(n, o) for n, o in zip(names, full)],
                               names, layer)
        o = w.get(f"{prefix}.o_proj.weight", (hid, cfg.num_heads * d), cols=None if whole else split.in_cols("o_proj"))
        self.o_proj = Linear([o], None, ("o_proj",), layer)
        self.layer, self.h, self.kvh, self.d, self.group = layer, h, kvh, d, group

    def __call__(self, x, positions, rotary: RotaryEmbedding, k_cache, v_cache, ops: TorchOps):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x)
        attention = get_forward_context().attention
        v = v.view(t, self.kvh, self.d)
        q, k = ops.rope_store(rotary, q.view(t, self.h, self.d), k.view(t, self.kvh, self.d), v, positions,
                              attention.slots, k_cache, v_cache)
        out = attention.forward(q, k, v, k_cache, v_cache)
        return self.group.all_reduce(self.o_proj(out.reshape(t, self.h * self.d))[0])


class MLP:
    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, split: Split, group: Group):
        hid, inter = cfg.hidden_size, cfg.intermediate_size
        whole = split.world == 1

        def col(name: str) -> torch.Tensor:
            return w.get(f"{prefix}.{name}.weight", (inter, hid), rows=None if whole else split.out_rows(name))

        self.gate_up_proj = Linear([col("gate_proj"), col("up_proj")], None, ("gate_proj", "up_proj"), layer)
        down = w.get(f"{prefix}.down_proj.weight", (hid, inter), cols=None if whole else split.in_cols("down_proj"))
        self.down_proj = Linear([down], None, ("down_proj",), layer)
        self.group = group

    def __call__(self, x, ops: TorchOps):
        gate, up = self.gate_up_proj(x)
        return self.group.all_reduce(self.down_proj(ops.silu_mul(gate, up))[0])


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, w: Weights, layer: int, split: Split, group: Group):
        p = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(w.get(f"{p}.input_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(
            w.get(f"{p}.post_attention_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps
        )
        self.self_attn = Attention(cfg, w, f"{p}.self_attn", layer, split, group)
        self.mlp = MLP(cfg, w, f"{p}.mlp", layer, split, group)


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, w: Weights, split: Split | None = None, group: Group = SINGLE):
        split = split or Split.of(cfg)
        self.full_config = cfg  # the checkpoint's
        self.config = split.local  # this rank's share: what the KV cache, attention and LoRA slots are sized by
        self.split, self.group = split, group
        self.device, self.dtype = w.device, w.dtype
        vocab = None if split.world == 1 else split.vocab_rows()
        pad = None if split.world == 1 else split.vocab
        self.embed_tokens = w.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), rows=vocab, pad_rows=pad)
        self.layers = [DecoderLayer(cfg, w, i, split, group) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(w.get("model.norm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps)
        if cfg.tie_word_embeddings and not w.has("lm_head.weight"):
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = w.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), rows=vocab, pad_rows=pad)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, w.device, w.dtype)
        self.ops = make_ops(w.device)
        self._lm_head_cpu = packed_linear(self.lm_head)  # the CPU's packed GEMM, else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world == 1:
            return F.embedding(input_ids, self.embed_tokens)
        # Vocabulary-parallel: the rank owning a token gives its row, the others zeros.
        local = input_ids - self.split.rank * self.split.vocab
        mine = (local >= 0) & (local < self.split.vocab)
        rows = F.embedding(local.clamp(0, self.split.vocab - 1), self.embed_tokens)
        return self.group.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_caches, v_caches) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden].

        The residual stream is carried beside each sublayer's output and added in the next norm
        (`add_rmsnorm`), so that on CUDA the add and the norm are one kernel."""
        ops = self.ops
        residual = self.embed(input_ids)
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
        """hidden: [N, hidden] -> float32 logits [N, vocab] (written into `out` when given); under
        tensor parallelism each rank's vocabulary share, gathered."""
        logits = self._lm_head_cpu(hidden) if self._lm_head_cpu is not None else F.linear(hidden, self.lm_head)
        if self.group.world > 1:
            logits = self.group.all_gather(logits)[:, : self.full_config.vocab_size]
        return logits.float() if out is None else out.copy_(logits)

