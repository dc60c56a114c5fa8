"""Writes a random-weight model directory (config.json, safetensors, a word-level tokenizer.json).

Shapes: `llama-8b-shape` (Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, inter 14336, vocab 128256,
rope theta 500000), `qwen3-8b-shape` (Qwen3-8B: hidden 4096, 36 layers, 32/8 heads of 128, q/k norms,
inter 12288, vocab 151936), `mixtral-8x7b-shape-16l` (Mixtral-8x7B's layers, 8 experts of 14336,
top 2, but 16 of its 32 layers: 47 GB, what the GPU machine's 64 GB disk holds beside the rest),
`smollm2-135m` (the default model's shape), `tiny` and `tiny-mixtral` (for CPU tests).
The tokenizer maps the word `t<i>` to token i, so load generators can send exact token counts.
There is no end-of-sequence token: generations always run to max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                           tie_word_embeddings=False),
    # Llama-3-70B's shape: 70.6B parameters, 141 GB in bf16, more than one H200 holds with room for a
    # KV cache (#16 serves it at --num-shard 2; write it where there is room, e.g. /dev/shm).
    "llama-70b-shape": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                            max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen3-8b-shape": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                           intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=8192,
                           tie_word_embeddings=False),
    "mixtral-8x7b-shape-16l": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                                   intermediate_size=14336, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32000, rope_theta=1000000.0,
                                   max_position_embeddings=8192, tie_word_embeddings=False, num_local_experts=8,
                                   num_experts_per_tok=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny-mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                         num_local_experts=4, num_experts_per_tok=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}


def tensors(cfg: dict, dtype: torch.dtype, device: str):
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    kind = cfg.get("model_type", "llama")
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    yield "model.embed_tokens.weight", rnd(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", torch.ones(h, dtype=dtype, device=device)
        yield f"{p}.post_attention_layernorm.weight", torch.ones(h, dtype=dtype, device=device)
        yield f"{p}.self_attn.q_proj.weight", rnd(heads * d, h)
        yield f"{p}.self_attn.k_proj.weight", rnd(kvh * d, h)
        yield f"{p}.self_attn.v_proj.weight", rnd(kvh * d, h)
        yield f"{p}.self_attn.o_proj.weight", rnd(h, heads * d)
        if kind == "qwen3":
            yield f"{p}.self_attn.q_norm.weight", torch.ones(d, dtype=dtype, device=device)
            yield f"{p}.self_attn.k_norm.weight", torch.ones(d, dtype=dtype, device=device)
        if kind == "mixtral":
            yield f"{p}.block_sparse_moe.gate.weight", rnd(cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                q = f"{p}.block_sparse_moe.experts.{e}"
                yield f"{q}.w1.weight", rnd(inter, h)
                yield f"{q}.w3.weight", rnd(inter, h)
                yield f"{q}.w2.weight", rnd(h, inter)
            continue
        yield f"{p}.mlp.gate_proj.weight", rnd(inter, h)
        yield f"{p}.mlp.up_proj.weight", rnd(inter, h)
        yield f"{p}.mlp.down_proj.weight", rnd(h, inter)
    yield "model.norm.weight", torch.ones(h, dtype=dtype, device=device)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", rnd(v, h)


def word_tokenizer(vocab: int) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab)}, "unk_token": "t0"},
    }


def write(shape: str, out: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", shard_bytes: int = 4 << 30) -> Path:
    cfg = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), "eos_token_id": None,
              "bos_token_id": None, **cfg}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    (out / "tokenizer.json").write_text(json.dumps(word_tokenizer(cfg["vocab_size"])))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    shard, size, n, index = {}, 0, 0, {}
    for name, t in tensors(cfg, dtype, device):
        shard[name] = t.contiguous().cpu()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            n = _flush(out, shard, n, index)
            shard, size = {}, 0
    if shard:
        _flush(out, shard, n, index)
    total = sum((out / f).stat().st_size for f in set(index.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    return out


def _flush(out: Path, shard: dict, n: int, index: dict) -> int:
    name = f"model-{n:05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    index.update({k: name for k in shard})
    return n + 1


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def step_weight_bytes(model_dir: Path, batch: int) -> tuple[int, float]:
    """(bytes of weights a decode step of `batch` rows reads, experts read per mixture layer). A
    mixture of experts reads only the experts its tokens chose: with top-k routing that is
    uniform and independent (random weights, random tokens; `moe_routing.py` measures it), a
    layer's batch reads E * (1 - (1 - k/E)^batch) experts in expectation."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    total = weight_bytes(model_dir)
    e = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if not e:
        return total, 0.0
    k = cfg["num_experts_per_tok"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    elem = 2 if cfg.get("torch_dtype", "bfloat16") in ("bfloat16", "float16") else 4
    expert = 3 * inter * cfg["hidden_size"] * elem
    experts = cfg["num_hidden_layers"] * e * expert
    hit = e * (1 - (1 - k / e) ** batch)
    return total - experts + int(cfg["num_hidden_layers"] * hit * expert), hit


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(write(a.shape, a.out, getattr(torch, a.dtype), a.device))
