"""Every family beyond Llama (families.py) against transformers on the same random weights: prompt
logits, greedy tokens alone and batched, a peft adapter beside base rows; the mixture-of-experts
kernel against its reference; LongRoPE's long factors; refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import families
from conftest import BLOCK, batch
from shard_calls import generate, name_adapters, prompt_logits

PROMPTS = [[5, 9, 14, 3, 22, 7, 40, 11, 2, 50, 51, 52, 60, 70, 71, 3, 9],  # longer than the window (8)
           [8, 2, 60, 61, 30],
           [33, 12, 19, 90, 4, 4, 17, 25, 6, 44, 45, 46, 47]]
N = 10


def _engine(path: Path, adapters: tuple = (), num_blocks: int = 128):
    from text_generation_server.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(path, torch.float32, torch.device("cpu"), block_size=BLOCK, lora_adapters=adapters))
    warm, _ = batch(999, [[2, 3, 4]], 1)
    eng.warmup(warm, num_blocks)
    return eng


@pytest.fixture(scope="module", params=families.FAMILIES)
def family(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    path, ref = families.write(root / "model", kind)
    return kind, path, ref, root


def test_prompt_logits_match_transformers(family):
    kind, path, ref, _ = family
    eng = _engine(path)
    ids = torch.randint(2, 97, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = prompt_logits(eng, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert eng.model.full_config.architecture == type(ref).__name__


def test_greedy_matches_transformers_alone_and_batched(family):
    kind, path, ref, _ = family
    eng = _engine(path)
    want = [families.greedy(ref, p, N) for p in PROMPTS]
    alone = [generate(eng, batch(10 + i, [p], N)[0], N)[0] for i, p in enumerate(PROMPTS)]
    assert alone == want
    assert generate(eng, batch(1, PROMPTS, N)[0], N) == want


def test_lora_matches_peft_beside_base_rows(family):
    from peft import PeftModel

    kind, path, ref, root = family
    lora = families.adapter(root / "lora", path, kind)
    eng = _engine(path, (("a", lora),))
    tuned = PeftModel.from_pretrained(ref, lora).eval()
    want = [families.greedy(tuned, PROMPTS[0], N), None, families.greedy(tuned, PROMPTS[2], N)]
    tuned.unload()  # peft wraps `ref` in place: the base rows compare with the model as it was
    want[1] = families.greedy(ref, PROMPTS[1], N)
    pb_batch, _ = batch(1, PROMPTS, N)
    name_adapters(pb_batch, {0: "a", 2: "a"})
    got = generate(eng, pb_batch, N)
    assert got == want
    assert got[0] != families.greedy(ref, PROMPTS[0], N), "the adapter changes the answer"


@pytest.mark.parametrize("kind", sorted(families.MOE))
def test_lora_on_experts_is_refused_by_name(tmp_path, kind):
    from safetensors.torch import save_file

    from text_generation_server.errors import ShardError
    from text_generation_server.lora.adapter import read_adapter
    from text_generation_server.models.config import ModelConfig

    path, _ = families.write(tmp_path / "m", kind)
    cfg = ModelConfig.from_dir(path)
    expert = ("block_sparse_moe.experts.0.w1" if kind == "mixtral" else "mlp.experts.0.gate_proj")
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    save_file({f"base_model.model.model.layers.0.{expert}.lora_A.weight": torch.zeros(2, 64),
               f"base_model.model.model.layers.0.{expert}.lora_B.weight": torch.zeros(24 if kind != "mixtral" else 96, 2)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ShardError, match="mixture-of-experts MLP") as e:
        read_adapter("x", d, cfg, torch.float32)
    assert e.value.code.name == "BAD_ADAPTER"


def test_unsupported_architectures_are_refused_with_the_list(tmp_path):
    import json

    from text_generation_server.models import REGISTRY, load_model
    from text_generation_server.models.config import ConfigError

    path, _ = families.write(tmp_path / "m", "qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(path, torch.float32, torch.device("cpu"))
    assert "'FalconForCausalLM' is not supported" in str(e.value)
    assert all(arch in str(e.value) for arch in REGISTRY)
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    cfg["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]
    cfg["sliding_window"], cfg["model_type"] = 8, "gemma3_text"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer type 'chunked_attention' is not supported"):
        load_model(path, torch.float32, torch.device("cpu"))


def test_gemma3_multimodal_checkpoints_serve_their_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up): its text_config and the decoder under
    language_model.model, against transformers' text-only generate; a hub-style config that lists
    only what differs from the defaults reads as transformers reads it; LoRA on the image encoder
    is refused."""
    import json

    import transformers as tf
    from safetensors.torch import save_file

    from text_generation_server.errors import ShardError
    from text_generation_server.lora.adapter import read_adapter
    from text_generation_server.models.config import ConfigError, ModelConfig

    ref = families.gemma3_multimodal()
    ref.save_pretrained(tmp_path / "m")
    eng = _engine(tmp_path / "m")
    assert eng.model.prefix in ("language_model.model", "model.language_model")
    want = [families.greedy(ref, p, N) for p in PROMPTS]
    assert generate(eng, batch(1, PROMPTS, N)[0], N) == want

    hub_style = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                 "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                 "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                 "sliding_window": 1024}, "eos_token_id": [1, 106]}
    ours = ModelConfig.from_dict(hub_style)
    theirs = tf.Gemma3Config(**{k: v for k, v in hub_style.items() if k != "architectures"}).text_config
    assert (ours.vocab_size, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim)
    assert ours.layer_windows == tuple(1024 if t == "sliding_attention" else None for t in theirs.layer_types)
    assert (ours.rope.kind, ours.rope.factor, ours.rope.theta, ours.rope_local.theta) == ("linear", 8.0, 1e6, 1e4)
    assert ours.attn_scale == 256 ** -0.5 and ours.eos_token_ids == (1, 106)
    with pytest.raises(ConfigError, match="without a text_config"):
        ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"]})

    d = tmp_path / "vision-lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    key = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 32), f"{key}.lora_B.weight": torch.zeros(32, 2)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ShardError, match="image encoder"):
        read_adapter("v", d, eng.model.full_config, torch.float32)


def test_longrope_table_has_the_short_then_the_long_factors():
    """The rotary table's first half rotates with the short factors, its second half (index
    position + max_positions) with the long ones, as transformers does for a sequence within the
    original context and one longer than it."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from text_generation_server.layers.rotary import RotaryEmbedding
    from text_generation_server.models.config import ModelConfig

    cfg_tf, _ = families.config("phi3")
    ours_cfg = ModelConfig.from_dict(cfg_tf.to_dict())
    assert ours_cfg.rope.kind == "longrope" and ours_cfg.rotary_dim == 8
    ours = RotaryEmbedding(ours_cfg.rope, ours_cfg.rotated, 256, torch.device("cpu"), torch.float32)
    theirs = Phi3RotaryEmbedding(cfg_tf)
    x = torch.zeros(1, 1, 8)
    short, long = torch.arange(64), torch.arange(200)
    for positions, offset in ((short, 0), (long, 256)):
        cos, sin = theirs(x, positions[None])
        torch.testing.assert_close(ours.cos[positions + offset], cos[0])
        torch.testing.assert_close(ours.sin[positions + offset], sin[0])
    assert ours.scale > 1.0  # the attention factor of a context 4x the original


def test_longrope_rows_past_the_original_context_match_transformers(tmp_path):
    """Phi-3 (original context 64): prompts longer than it, alone and beside a short one, are
    rotated with the long factors throughout, as transformers does; the short one with the short
    factors."""
    path, ref = families.write(tmp_path / "m", "phi3")
    eng = _engine(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (70, 12, 90)]
    want = [families.greedy(ref, p, N) for p in prompts]
    assert generate(eng, batch(1, prompts, N)[0], N) == want
    assert generate(eng, batch(2, prompts[:1], N)[0], N) == want[:1]
    with torch.no_grad():  # and one forward of the long prompt (the logits helper the GPU tests use)
        theirs = ref(torch.tensor([prompts[0]])).logits[0].float()
    torch.testing.assert_close(prompt_logits(eng, prompts[0]), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(families.MOE))
def test_forced_routing_moves_ours_and_transformers_alike(tmp_path, kind):
    """The GPU family tests put transformers' routers on the experts ours picked
    (`families.our_routing` / `their_routing`): with every token's experts forced elsewhere, our
    float32 path and transformers' agree as closely as when free, and both differ from free."""
    path, ref = families.write(tmp_path / "m", kind)
    eng = _engine(path)
    ids = torch.randint(2, 97, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    with families.our_routing() as chosen:
        free = prompt_logits(eng, ids)
    assert len(chosen) == families.moe_layers(ref) > 0 and chosen[0].shape == (len(ids), 2)
    force = [(c + 1) % families.EXPERTS for c in chosen]  # every token another pair of experts
    with families.our_routing(force) as seen:
        ours = prompt_logits(eng, ids)
    assert all(torch.equal(a, b) for a, b in zip(seen, force))
    with torch.no_grad(), families.their_routing(ref, force):
        theirs = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - free).abs().max() > 1e-2  # a hundred times the tolerance
    with pytest.raises(AssertionError, match="fewer"), families.our_routing(force + force[:1]):
        prompt_logits(eng, ids)
    with pytest.raises(AssertionError, match="more"), families.our_routing(force[:-1]):
        prompt_logits(eng, ids)
    with pytest.raises(AssertionError, match="more"), torch.no_grad(), families.their_routing(ref, force[:-1]):
        ref(torch.tensor([ids]))


def test_moe_kernel_under_the_interpreter():
    """The CUDA grouped-GEMM experts (`layers/moe_triton.py`), run by Triton's interpreter on the
    CPU against the reference path, decode-sized and prefill-sized; the one-program `align` kernel
    against the torch sort it replaces for decode-sized inputs; the one-kernel router (softmax and
    top-k) against torch's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("checked") == 3
    assert r.stdout.count("aligned") == 9
    assert r.stdout.count("routed") == 5


def test_moe_tiles_follow_the_pairs_per_expert():
    """The kernel's tiles are chosen by how full an expert's row blocks get: Mixtral's measured
    steps, and a 128-expert model's prefill not padded into 128-row blocks it fills by 1/16."""
    from text_generation_server.layers.moe_triton import _config

    assert [_config(m, 8)["BM"] for m in (2, 64, 128, 512, 1024, 4096)] == [16, 16, 32, 64, 128, 128]
    assert _config(4096, 8)["BN"] == 256 and _config(1024, 8)["BN"] == 128
    assert _config(1024, 128)["BM"] == 16 and _config(16384, 128)["BM"] == 128


def _interpreted() -> None:
    from text_generation_server.layers.moe import reference, route, route_torch
    from text_generation_server.layers.moe_triton import ALIGN_KERNEL_MAX_PAIRS, align, align_torch, fused_moe, route_topk
    from text_generation_server.layers.ops import TorchOps

    # (tokens, experts, top_k, block rows): Mixtral's decode, Qwen3-MoE's 128 experts top-8,
    # Qwen2-MoE's 60 (not a power of two), every token on one expert, and past the kernel's size.
    for t, e, k, bm in ((1, 8, 2, 16), (7, 8, 2, 16), (64, 8, 2, 32), (33, 60, 4, 16), (128, 128, 8, 16),
                        (300, 8, 2, 64), (300, 8, 2, 128), (40, 8, 2, 16), (ALIGN_KERNEL_MAX_PAIRS, 8, 2, 16)):
        g = torch.Generator().manual_seed(t * e)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        if t == 40:
            ids[:, 0] = 5
        got, want = align(ids, e, bm), align_torch(ids, e, bm)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (t, e, k, bm)
        print("aligned")
    # bf16 router logits tie often (60 and 128 experts here): the same probabilities chosen, the
    # lower expert first among equals; a row of equal logits takes experts 0..k-1.
    for t, e, k, renormalize in ((1, 8, 2, True), (5, 8, 2, False), (33, 60, 4, True), (70, 128, 8, True), (3, 4, 1, True)):
        logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t)).bfloat16()
        logits[-1] = 0.5
        (w, i), (want_w, want_i) = route_topk(logits, k, renormalize), route_torch(logits, k, renormalize)
        probs = torch.softmax(logits.float(), dim=-1)
        assert torch.equal(probs.gather(1, i), probs.gather(1, want_i)) and i.dtype == want_i.dtype
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
        chosen = probs.gather(1, i)
        assert not ((chosen[:, 1:] == chosen[:, :-1]) & (i[:, 1:] < i[:, :-1])).any()
        assert i[-1].tolist() == list(range(k))
        print("routed")
    nan = torch.zeros(2, 8)
    nan[0, 3] = float("nan")  # a broken hidden state: garbage out, but no expert id past the end
    assert int(route_topk(nan, 2, True)[1].max()) < 8
    ops = TorchOps()
    for t, e, k, hid, inter in ((1, 8, 2, 32, 48), (5, 8, 2, 32, 48), (70, 4, 1, 16, 24)):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(t, hid, generator=g)
        w13, w2 = torch.randn(e, 2 * inter, hid, generator=g) * 0.2, torch.randn(e, hid, inter, generator=g) * 0.2
        weights, ids = route(torch.randn(t, e, generator=g), k, True)
        pairs, experts = align(ids, e, 16)
        # Every pair once, in expert order, each block one expert's.
        real = pairs[pairs < t * k]
        assert sorted(real.tolist()) == list(range(t * k))
        assert all(int(ids.flatten()[p]) == int(experts[i // 16]) for i, p in enumerate(pairs.tolist()) if p < t * k)
        act = lambda a, b: ops.act_mul("silu", a, b)  # noqa: E731
        want = reference(x, w13, w2, weights, ids, act)
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, act), want, rtol=1e-4, atol=1e-4)
        split = dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=2, SPLIT_K=3)  # K slices added atomically
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, act, split), want, rtol=1e-4, atol=1e-4)
        print("checked")


if __name__ == "__main__":
    _interpreted()
