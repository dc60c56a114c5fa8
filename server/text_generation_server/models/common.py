"""The parts every decoder-only family is built from: attention, the dense MLP, the embedding and
LM head, and the decoder loop. A family file (`llama.py`, `gemma.py`, ...) picks them, names its
checkpoint's tensors and says how a layer strings them together (`DecoderLayer.__call__`).

Tokens of all sequences of a step are flattened into one ragged [T] batch; attention reads the
paged cache through the backend planned in the forward context. Under tensor parallelism each
rank holds its share (`parallel.Split`) and the row-parallel outputs, the embedding and the
logits go through the group's collectives; at world size 1 there are none. Every projection a
LoRA adapter may target is a `Linear` named by its PEFT name.
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


def column_parallel(w: Weights, split: Split, parts: list[tuple[str, str, int, int]], cols: int) -> list[torch.Tensor]:
    """Weights of column-parallel projections: for each (tensor name, projection, row offset,
    tensor rows), this rank's rows of that projection (all of them at world size 1). Separate
    tensors have offset 0; a checkpoint that fuses projections in one tensor (Phi-3's qkv_proj)
    names it once per projection, at the projection's offset."""
    out = []
    for name, proj, offset, total in parts:
        lo, hi = split.out_rows(proj)
        out.append(w.get(name, (total, cols), rows=(offset + lo, offset + hi)))
    return out


class Attention:
    """Self-attention over the paged cache, with the layer's window (`cfg.layer_windows`) and
    rotary table. `fused_qkv`: the tensor name when the checkpoint holds q, k and v in one (Phi-3);
    `gemma_norm`: Gemma's (1 + w) q/k norms."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, split: Split, group: Group,
                 rotary: RotaryEmbedding, fused_qkv: str | None = None, gemma_norm: bool = False):
        h, kvh, d, hid = split.heads, split.kv_heads, cfg.head_dim, cfg.hidden_size
        names = ("q_proj", "k_proj", "v_proj")
        full = {"q_proj": cfg.num_heads * d, "k_proj": cfg.num_kv_heads * d, "v_proj": cfg.num_kv_heads * d}
        if fused_qkv is None:
            parts = [(f"{prefix}.{n}.weight", n, 0, full[n]) for n in names]
        else:
            total, offsets = sum(full.values()), (0, full["q_proj"], full["q_proj"] + full["k_proj"])
            parts = [(fused_qkv, n, o, total) for n, o in zip(names, offsets)]
        weights = column_parallel(w, split, parts, hid)
        biases = None
        if cfg.qkv_bias:
            biases = [w.get(f"{prefix}.{n}.bias", (full[n],), rows=split.out_rows(n)) for n in names]
        self.qkv_proj = Linear(weights, biases, names, layer)
        o = w.get(f"{prefix}.o_proj.weight", (hid, cfg.num_heads * d), cols=split.in_cols("o_proj"))
        self.o_proj = Linear([o], None, ("o_proj",), layer)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # one RMSNorm over each head (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(w.get(f"{prefix}.q_norm.weight", (d,)), cfg.rms_norm_eps, gemma_norm)
            self.k_norm = RMSNorm(w.get(f"{prefix}.k_norm.weight", (d,)), cfg.rms_norm_eps, gemma_norm)
        self.window = cfg.layer_windows[layer]
        self.rotary = rotary
        self.layer, self.h, self.kvh, self.d, self.group = layer, h, kvh, d, group

    def __call__(self, x, positions, k_cache, v_cache, ops: TorchOps):
        t, d = x.shape[0], self.d
        q, k, v = self.qkv_proj(x)
        attention = get_forward_context().attention
        q, k, v = q.view(t, self.h, d), k.view(t, self.kvh, d), v.view(t, self.kvh, d)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(t * self.h, d), ops).view(t, self.h, d)
            k = self.k_norm(k.reshape(t * self.kvh, d), ops).view(t, self.kvh, d)
        q, k = ops.rope_store(self.rotary, q, k, v, positions, attention.cache_locs, k_cache, v_cache)
        out = attention.forward(q, k, v, k_cache, v_cache, window=self.window)
        return self.group.all_reduce(self.o_proj(out.reshape(t, self.h * d))[0])


class MLP:
    """The gated dense MLP: down(act(gate(x)) * up(x)). `gate_up`: the tensor name when the
    checkpoint fuses gate and up (gate rows first, Phi-3), else None. `size`: the intermediate
    size (default the config's), `share`: this rank's rows of it (default `split.inter`: all of
    them at world size 1)."""

    def __init__(self, cfg: ModelConfig, w: Weights, prefix: str, layer: int, split: Split, group: Group,
                 gate_up: str | None = None, size: int | None = None, share: tuple[int, int] | None = None,
                 lora: bool = True):
        hid = cfg.hidden_size
        inter = size or cfg.intermediate_size
        lo, hi = share or split.inter
        if gate_up is not None:
            parts = [w.get(gate_up, (2 * inter, hid), rows=(o + lo, o + hi)) for o in (0, inter)]
        else:
            parts = [w.get(f"{prefix}.{n}.weight", (inter, hid), rows=(lo, hi)) for n in ("gate_proj", "up_proj")]
        down = w.get(f"{prefix}.down_proj.weight", (hid, inter), cols=(lo, hi))
        # LoRA reaches the model's MLP by its PEFT names; a shared expert's is not a target (layer -1).
        self.gate_up_proj = Linear(parts, None, ("gate_proj", "up_proj"), layer if lora else -1)
        self.down_proj = Linear([down], None, ("down_proj",), layer if lora else -1)
        self.act = cfg.hidden_act
        self.group = group

    def partial(self, x, ops: TorchOps):
        """This rank's partial sum of the output (before the all-reduce)."""
        gate, up = self.gate_up_proj(x)
        return self.down_proj(ops.act_mul(self.act, gate, up))[0]

    def __call__(self, x, ops: TorchOps):
        return self.group.all_reduce(self.partial(x, ops))


class DecoderLayer:
    """Llama's layer: x + attn(norm(x)), then x + mlp(norm(x)). Families with other layouts
    override `__call__` (Gemma's post-norms)."""

    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm, mlp):
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def __call__(self, x, residual, positions, k_cache, v_cache, ops: TorchOps):
        """x: the previous layer's output not yet added to `residual` (None before the first
        layer, where `residual` is the embedding). Returns (this layer's output, residual).

        The residual stream is carried beside each sublayer's output and added in the next norm
        (`add_rmsnorm`), so that on CUDA the add and the norm are one kernel."""
        if x is None:
            h = self.input_layernorm(residual, ops)
        else:
            h, residual = self.input_layernorm.add(x, residual, ops)
        x = self.self_attn(h, positions, k_cache, v_cache, ops)
        h, residual = self.post_attention_layernorm.add(x, residual, ops)
        return self.mlp(h, ops), residual


class CausalLM:
    """A decoder-only model: embedding, layers, final norm, LM head. A family sets `gemma` (the
    embedding scaled by sqrt(hidden), Gemma's norms) and overrides what it builds differently:
    `make_attention`, `make_mlp`, or the whole layer (`make_layer`)."""

    gemma = False
    prefixes = ("model",)
    """Where the checkpoint keeps the decoder's tensors (the first that holds embed_tokens is used)."""

    def __init__(self, cfg: ModelConfig, w: Weights, split: Split | None = None, group: Group = SINGLE):
        split = split or Split.of(cfg)
        self.full_config = cfg  # the checkpoint's
        self.config = split.local  # this rank's share: what the KV cache, attention and LoRA slots are sized by
        self.split, self.group = split, group
        self.device, self.dtype = w.device, w.dtype
        self.prefix = next((q for q in self.prefixes if w.has(f"{q}.embed_tokens.weight")), self.prefixes[0])
        p = self.prefix
        vocab, pad = split.vocab_rows(), split.vocab  # all of it at world size 1
        self.embed_tokens = w.get(f"{p}.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), rows=vocab, pad_rows=pad)
        # Gemma scales the embedding by sqrt(hidden), rounded to the model's dtype.
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=w.dtype).item() if self.gemma else None
        max_pos = cfg.max_position_embeddings
        self.rotary = RotaryEmbedding(cfg.rope, cfg.rotated, max_pos, w.device, w.dtype)
        # Gemma 3: sliding-window layers have their own rotary base.
        self.rotary_local = (RotaryEmbedding(cfg.rope_local, cfg.rotated, max_pos, w.device, w.dtype)
                             if cfg.rope_local is not None else self.rotary)
        self.layers = [self.make_layer(cfg, w, i, split, group) for i in range(cfg.num_layers)]
        self.norm = self.norm_of(cfg, w, f"{p}.norm")
        # The LM head beside the decoder: lm_head, or language_model.lm_head under language_model.model.
        head = (self.prefix.removesuffix("model") if self.prefix.endswith(".model") else "") + "lm_head.weight"
        if cfg.tie_word_embeddings and not w.has(head):
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = w.get(head, (cfg.vocab_size, cfg.hidden_size), rows=vocab, pad_rows=pad)
        self.ops = make_ops(w.device)
        self._lm_head_cpu = packed_linear(self.lm_head)  # the CPU's packed GEMM, else None

    def rotary_of(self, cfg: ModelConfig, layer: int) -> RotaryEmbedding:
        return self.rotary_local if cfg.layer_windows[layer] else self.rotary

    def norm_of(self, cfg: ModelConfig, w: Weights, name: str) -> RMSNorm:
        """The RMSNorm of tensor `name` (without `.weight`)."""
        return RMSNorm(w.get(f"{name}.weight", (cfg.hidden_size,)), cfg.rms_norm_eps, self.gemma)

    def make_layer(self, cfg: ModelConfig, w: Weights, i: int, split: Split, group: Group) -> DecoderLayer:
        p = f"{self.prefix}.layers.{i}"
        return DecoderLayer(self.norm_of(cfg, w, f"{p}.input_layernorm"),
                            self.make_attention(cfg, w, f"{p}.self_attn", i, split, group),
                            self.norm_of(cfg, w, f"{p}.post_attention_layernorm"),
                            self.make_mlp(cfg, w, f"{p}.mlp", i, split, group))

    def make_attention(self, cfg: ModelConfig, w: Weights, prefix: str, i: int, split: Split, group: Group) -> Attention:
        return Attention(cfg, w, prefix, i, split, group, self.rotary_of(cfg, i), gemma_norm=self.gemma)

    def make_mlp(self, cfg: ModelConfig, w: Weights, prefix: str, i: int, split: Split, group: Group):
        return MLP(cfg, w, prefix, i, split, group)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world == 1:
            x = F.embedding(input_ids, self.embed_tokens)
        else:
            # Vocabulary-parallel: the rank owning a token gives its row, the others zeros.
            local = input_ids - self.split.rank * self.split.vocab
            mine = (local >= 0) & (local < self.split.vocab)
            rows = F.embedding(local.clamp(0, self.split.vocab - 1), self.embed_tokens)
            x = self.group.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))
        return x * self.embed_scale if self.embed_scale is not None else x

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_caches, v_caches) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]."""
        ops = self.ops
        residual = self.embed(input_ids)
        x = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, k_caches[i], v_caches[i], ops)
        return self.norm.add(x, residual, ops)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] (written into `out` when given); under
        tensor parallelism each rank's vocabulary share, gathered. Gemma 2 soft-caps them."""
        logits = self._lm_head_cpu(hidden) if self._lm_head_cpu is not None else F.linear(hidden, self.lm_head)
        if self.group.world > 1:
            logits = self.group.all_gather(logits)[:, : self.full_config.vocab_size]
        cap = self.full_config.final_softcap
        if cap is not None:
            logits = torch.tanh(logits.float() / cap) * cap
        return logits.float() if out is None else out.copy_(logits)
