"""Tensor parallelism on the CPU: each sharded layer, the whole model and the engine (with LoRA) at
world size 2 and 4 (gloo, ranks spawned here) against the unsharded reference on the same
weights; odd head counts per rank, KV heads replicated, a vocabulary that does not divide."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import BLOCK, batch
from shard_calls import generate, name_adapters

# (query heads, KV heads, world): 9 heads in 3 KV groups over 2 ranks (the default model's shape:
# 3 + 6 heads); 3 heads per rank (odd); KV heads replicated (2 KV heads over 4 ranks); one head per
# rank; an intermediate size (66) that splits unevenly at 4; a vocabulary (97) that pads at 2 and 4.
LAYOUTS = [(9, 3, 2), (6, 2, 2), (12, 2, 4), (4, 4, 4), (4, 1, 2)]


def _tiny(path, heads: int, kv_heads: int, seed: int = 0, head_dim: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=head_dim * heads, intermediate_size=66, num_hidden_layers=2,
                      head_dim=head_dim,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rms_norm_eps=1e-5, eos_token_id=1, bos_token_id=0, tie_word_embeddings=(heads == 12))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _adapter(path, model_dir, r: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    m.save_pretrained(path)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS = [[5, 9, 14, 3, 22, 7, 40], [8, 2, 60, 61], [33, 12, 19, 90, 4, 4, 17, 25, 6]]


def _run(rank: int, world: int, port: int, model_dir: str, adapter: str | None, out: str):
    """One rank: the layers on their own, then the engine generating for PROMPTS (base and adapter rows)."""
    import torch.nn.functional as F

    from text_generation_server.engine import Engine, EngineConfig
    from text_generation_server.models.config import ModelConfig
    from text_generation_server.parallel import Split, init_group
    from text_generation_server.weights.loader import Weights

    torch.set_grad_enabled(False)
    group = init_group(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    results = {}
    cfg = ModelConfig.from_dir(model_dir)
    split = Split.of(cfg, rank, world)
    from text_generation_server.models.llama import MLP, LlamaForCausalLM

    w = Weights(model_dir, torch.float32, torch.device("cpu"))
    model = LlamaForCausalLM(cfg, w, split, group)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (11,), generator=g)
    results["embed"] = model.embed(ids)
    x = torch.randn(11, cfg.hidden_size, generator=g)
    results["mlp"] = MLP(cfg, w, "model.layers.1.mlp", 1, split, group)(x, model.ops)
    results["logits"] = model.compute_logits(x)
    results["params"] = w.numel
    eng = Engine(EngineConfig(model_dir, torch.float32, torch.device("cpu"), block_size=BLOCK, group=group,
                              lora_adapters=(("a", Path(adapter)),) if adapter else ()))
    warm, _ = batch(999, [[2, 3, 4]], 1)
    eng.warmup(warm, 64)
    # Greedy rows, and a sampled one (every rank must draw the same token).
    pb_batch, _ = batch(1, PROMPTS, 8)
    pb_batch.requests[2].parameters.do_sample = True
    pb_batch.requests[2].parameters.seed = 7
    name_adapters(pb_batch, {1: "a"} if adapter else None)
    results["tokens"] = generate(eng, pb_batch, 8)
    torch.save(results, f"{out}.{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


def _reference(model_dir, adapter, tmp_path):
    out = str(tmp_path / "ref.pt")
    _run(0, 1, 0, str(model_dir), adapter, out)
    return torch.load(f"{out}.0")


@pytest.mark.parametrize("heads, kv_heads, world", LAYOUTS)
def test_sharded_layers_and_engine_match_the_unsharded_model(tmp_path, heads, kv_heads, world):
    model_dir = _tiny(tmp_path / "m", heads, kv_heads)
    adapter = str(_adapter(tmp_path / "lora", model_dir)) if world == 2 else None
    ref = _reference(model_dir, adapter, tmp_path)
    out = str(tmp_path / "tp.pt")
    mp.spawn(_run, args=(world, _port(), str(model_dir), adapter, out), nprocs=world, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    tp = ranks[0]
    assert all(r["tokens"] == tp["tokens"] for r in ranks), "every rank must produce the same tokens"
    torch.testing.assert_close(tp["embed"], ref["embed"])
    torch.testing.assert_close(tp["mlp"], ref["mlp"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tp["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    assert tp["tokens"] == ref["tokens"]
    # Each rank reads its share: about 1/world of the layers (norms are replicated).
    assert tp["params"] < ref["params"] / world * 1.25, (tp["params"], ref["params"])


def test_splits_refuse_what_does_not_divide_and_place_replicated_kv_heads():
    from text_generation_server.models.config import ConfigError, ModelConfig
    from text_generation_server.parallel import Split

    def cfg(h, kvh, inter=64):
        return ModelConfig.from_dict({"vocab_size": 97, "hidden_size": 8 * h, "intermediate_size": inter,
                                      "num_hidden_layers": 1, "num_attention_heads": h, "num_key_value_heads": kvh,
                                      "head_dim": 8})

    s = [Split.of(cfg(12, 2), r, 4) for r in range(4)]
    assert [x.kv_start for x in s] == [0, 0, 1, 1] and all(x.kv_heads == 1 and x.heads == 3 for x in s)
    assert [x.q_start for x in s] == [0, 3, 6, 9]
    assert [x.vocab_rows() for x in s] == [(0, 25), (25, 50), (50, 75), (75, 97)] and s[0].vocab == 25
    s = [Split.of(cfg(9, 3, 1537), r, 2) for r in range(2)]  # SmolLM2-135M's heads
    assert [(x.heads, x.q_start, x.kv_heads, x.kv_start) for x in s] == [(3, 0, 1, 0), (6, 3, 2, 1)]
    assert [x.inter for x in s] == [(0, 768), (768, 1537)] and s[1].in_cols("o_proj") == (24, 72)
    assert Split.of(cfg(8, 8), 1, 2).out_rows("k_proj") == (4 * 8, 8 * 8)
    with pytest.raises(ConfigError, match="--num-shard 4 cannot split the model's 3 KV heads of 3 query heads"):
        Split.of(cfg(9, 3), 0, 4)
    with pytest.raises(ConfigError, match="--num-shard 4 cannot split"):
        Split.of(cfg(6, 2), 0, 4)  # 2 KV heads on 2 ranks each, 3 query heads each: not halvable
    with pytest.raises(ConfigError, match="exceeds the model's intermediate_size 2"):
        Split.of(cfg(4, 4, 2), 0, 4)


def _run_family(rank: int, world: int, port: int, model_dir: str, adapter: str, out: str):
    """One rank of a family model: prompt logits, and greedy tokens of base and adapter rows."""
    from text_generation_server.engine import Engine, EngineConfig
    from text_generation_server.parallel import init_group
    from shard_calls import prompt_logits

    torch.set_grad_enabled(False)
    group = init_group(rank, world, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
    eng = Engine(EngineConfig(Path(model_dir), torch.float32, torch.device("cpu"), block_size=BLOCK, group=group,
                              lora_adapters=(("a", Path(adapter)),)))
    warm, _ = batch(999, [[2, 3, 4]], 1)
    eng.warmup(warm, 64)
    results = {"logits": prompt_logits(eng, PROMPTS[2] * 2), "params": eng.model.num_parameters}
    eng.clear(None)
    pb_batch, _ = batch(1, PROMPTS, 8)
    name_adapters(pb_batch, {1: "a"})
    results["tokens"] = generate(eng, pb_batch, 8)
    torch.save(results, f"{out}.{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["gemma2", "phi3", "mixtral", "qwen2_moe"])
def test_families_sharded_match_the_unsharded_model(tmp_path, kind):
    """Soft caps and Gemma's norms (gemma2), fused q/k/v and gate/up with their LoRA (phi3), the
    experts split by columns with a replicated router (mixtral), and a shared expert (qwen2_moe)."""
    import families

    model_dir, _ = families.write(tmp_path / "m", kind)
    adapter = str(families.adapter(tmp_path / "lora", model_dir, kind))
    _run_family(0, 1, 0, str(model_dir), adapter, str(tmp_path / "ref.pt"))
    ref = torch.load(f"{tmp_path / 'ref.pt'}.0")
    out = str(tmp_path / "tp.pt")
    mp.spawn(_run_family, args=(2, _port(), str(model_dir), adapter, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == ref["tokens"]
    torch.testing.assert_close(ranks[0]["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    assert ranks[0]["params"] < ref["params"] * 0.65, (ranks[0]["params"], ref["params"])
