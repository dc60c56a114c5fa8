"""Multi-LoRA on the GPU: FlashInfer segment GEMM vs the grouped torch path, and whole-model decoding
with adapters under CUDA graphs vs eager vs the torch path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from text_generation_server.engine import Engine, EngineConfig
from text_generation_server.lora.adapter import GROUPS, PROJECTIONS, Adapter, projection_shapes, write_random_adapter
from text_generation_server.lora.segment import FlashInferSegmentMatmul, SegmentLoraStep
from text_generation_server.lora.slots import SlotTable
from text_generation_server.lora.step import LoraStep
from text_generation_server.lora.triton_lora import DECODE_BLOCK_M, PREFILL_BLOCK_M, TritonLoraStep
from text_generation_server.models.config import ModelConfig

from test_model_gpu import BS, PROMPTS, batch, run, write_model

CFG = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 512,
                             "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 8,
                             "num_key_value_heads": 2, "max_position_embeddings": 512})


def random_adapter(name: str, rank: int, targets, cfg: ModelConfig, seed: int, device) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(cfg)
    w = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            out_f, in_f = shapes[t]
            w[(layer, t)] = ((torch.randn(rank, in_f, generator=g) * 0.05).to(device, torch.bfloat16),
                             (torch.randn(out_f, rank, generator=g) * 0.05).to(device, torch.bfloat16))
    return Adapter(name, rank, 2.0, w)


@pytest.mark.parametrize("backend", ["auto", "sm80", "triton"])
def test_slot_kernels_match_grouped_torch(backend):
    """FlashInfer segment GEMM (both backends) and the Triton kernels (decode and prefill tiles)
    against the grouped torch path: mixed ranks 4-64 padded to 64, empty slots, base rows
    interleaved, each projection group's outputs as column views of one fused tensor."""
    dev = torch.device("cuda")
    specs = {"r4": (4, PROJECTIONS), "r16": (16, ("q_proj", "v_proj", "down_proj")), "r64": (64, ("gate_proj", "o_proj")),
             "r8": (8, ("k_proj", "up_proj"))}
    table = SlotTable(CFG, torch.bfloat16, dev, num_slots=6, max_rank=64)
    host = {n: random_adapter(n, r, t, CFG, i, "cpu") for i, (n, (r, t)) in enumerate(specs.items())}
    slot_of = {"": 0}
    for i, (n, a) in enumerate(host.items()):
        slot_of[n] = i + 2  # leave slot 1 empty: empty segments must be harmless
        table.write(i + 2, a)
    device_adapters = {n: Adapter(n, a.rank, a.scaling, {k: (x.to(dev), y.to(dev)) for k, (x, y) in a.weights.items()})
                       for n, a in host.items()}
    matmul = FlashInferSegmentMatmul(dev, backend) if backend != "triton" else None
    shapes = projection_shapes(CFG)
    rng = np.random.default_rng(0)
    for tokens in (1, 7, 64, 300, 1000):
        names = np.array(rng.choice(["", *specs], size=tokens).tolist(), dtype=object)
        if tokens == 1000:  # prompts: runs of one adapter
            names = np.repeat(["r4", "", "r64", "r16", "r8", "r4"], [300, 100, 250, 1, 149, 200]).astype(object)
        slots = np.array([slot_of[n] for n in names], dtype=np.int64)
        block_m = DECODE_BLOCK_M if tokens < 300 else PREFILL_BLOCK_M
        seg = TritonLoraStep(table, slots, block_m) if matmul is None else SegmentLoraStep(table, slots, matmul)
        ref = LoraStep(names, device_adapters, dev)
        for layer in range(CFG.num_layers):
            for group in GROUPS:
                x = torch.randn(tokens, shapes[group[0]][1], device=dev, dtype=torch.bfloat16)
                fused = torch.randn(tokens, sum(shapes[p][0] for p in group), device=dev, dtype=torch.bfloat16)
                ys = list(fused.clone().split([shapes[p][0] for p in group], dim=1))  # the Triton path adds in place
                wants = ref.apply(layer, group, x, list(fused.split([shapes[p][0] for p in group], dim=1)))
                for proj, y, got, want in zip(group, fused.split([shapes[p][0] for p in group], dim=1),
                                              seg.apply(layer, group, x, ys), wants):
                    got, want = got.float(), want.float()
                    delta = (want - y.float()).abs().max().item()
                    # The paths round differently (the Triton kernels add an fp32 delta into y and
                    # round once): allow an ulp of bf16 on y plus 2% of the delta.
                    bound = 2.0**-7 * want.abs() + 0.02 * max(delta, 1.0)
                    assert ((got - want).abs() <= bound).all(), (tokens, layer, proj)


def write_peft(path, cfg_dict, rank, targets, seed):
    """A PEFT directory with random non-zero weights for the GPU test model."""
    write_random_adapter(path, ModelConfig.from_dict(cfg_dict), rank, targets, torch.Generator().manual_seed(seed), 0.05)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gpu")
    path, _ = write_model(root)
    cfg = json.loads((path / "config.json").read_text())
    write_peft(root / "src" / "a8", cfg, 8, PROJECTIONS, 1)
    write_peft(root / "src" / "b32", cfg, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 2)
    write_peft(root / "src" / "c16", cfg, 16, ("gate_proj", "up_proj", "down_proj"), 3)
    return path, root / "src"


def lora_engine(path, src, graphs, slot_table=True):
    e = Engine(EngineConfig(path, torch.bfloat16, torch.device("cuda"), block_size=BS, cuda_graphs=graphs,
                            adapter_source=src, max_active_adapters=4, max_lora_rank=32))
    if not slot_table:
        e.adapters.slots = e.lora_kernels = None  # the grouped torch path, on per-adapter tensors
    e.warmup(batch(99, [[1, 2, 3]], 1), 256, max_total_tokens=512)
    return e


def run_with_adapters(engine, prompts, adapters, n):
    return run(engine, prompts, n, adapters)


@pytest.mark.parametrize("kernel", ["triton", "segment"])
def test_lora_under_cuda_graphs_matches_eager_and_the_torch_path(lora_model, kernel, monkeypatch):
    monkeypatch.setenv("TESSERA_LORA_KERNEL", kernel)
    path, src = lora_model
    graphs = lora_engine(path, src, (1, 2, 4, 8))
    eager = lora_engine(path, src, ())
    assert graphs.adapters.slots is not None and graphs.graphs.lora_graphs, "LoRA graphs captured"
    adapters = ["a8", None, "b32", "c16", "a8"]
    for prompts, names in ((PROMPTS[:1], adapters[:1]), (PROMPTS[:3], adapters[:3]), (PROMPTS, adapters)):
        t_g, lp_g = run_with_adapters(graphs, prompts, names, 16)
        t_e, lp_e = run_with_adapters(eager, prompts, names, 16)
        assert t_g == t_e, names
        for a, b in zip(lp_g, lp_e):
            assert max(abs(x - y) for x, y in zip(a, b)) < 2e-2
    base, _ = run_with_adapters(graphs, PROMPTS, [None] * 5, 16)
    assert all(base[i] != t_g[i] for i, a in enumerate(adapters) if a), "adapters change the output"
    assert base[1] == t_g[1], "a base row is untouched by its neighbours' adapters"
    # Against the grouped torch path in the same engine (FlashInfer attention, no slot table), so
    # only the LoRA arithmetic differs, on the first token (from the prefill).
    ref = lora_engine(path, src, (), slot_table=False)
    assert ref.adapters.slots is None and ref.attention.name == "flashinfer"
    assert_same_choices(first_tokens(graphs, PROMPTS, adapters), first_tokens(ref, PROMPTS, adapters))


def first_tokens(engine, prompts, adapters, top=5) -> list[tuple[int, dict[int, float]]]:
    """Each row's greedy first token and its top-`top` logprobs."""
    b = batch(1, prompts, 1)
    for r, a in zip(b.requests, adapters):
        r.top_n_tokens = top
        if a:
            r.adapter_id = a
    res, _ = engine.prefill(b)
    engine.clear(None)
    return [(int(t), dict(zip(ids.tolist(), lps.tolist()))) for t, ids, lps in zip(res.token_ids, res.top_ids, res.top_logprobs)]


def assert_same_choices(got, want, tol=0.25):
    """Two bf16 computations of the same model agree up to rounding: their logprobs of the tokens
    both rank in the top few are within `tol`, and where their greedy tokens differ it is at a
    near-tie of the reference. This random model's logits are large (16-32), so bf16 rounds them in
    steps of 0.125: on the CPU, bf16 paths that round the LoRA delta differently part from each
    other and from fp32 by one such step, and pick different tokens at near-ties."""
    for row, ((g, gt), (w, wt)) in enumerate(zip(got, want)):
        shared = gt.keys() & wt.keys()
        assert g in wt and w in gt and len(shared) >= 3, (row, got[row], want[row])
        assert all(abs(gt[t] - wt[t]) < tol for t in shared), (row, got[row], want[row])
        assert g == w or wt[w] - wt[g] < tol, (row, got[row], want[row])
