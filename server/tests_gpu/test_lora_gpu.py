"""Multi-LoRA on the GPU: FlashInfer segment GEMM vs the grouped torch path, and whole-model decoding
with adapters under CUDA graphs vs eager vs the torch path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from text_generation_server.engine import Engine, EngineConfig
from text_generation_server.lora.adapter import PROJECTIONS, Adapter, peft_key, projection_shapes
from text_generation_server.lora.segment import FlashInferSegmentMatmul, SegmentLoraStep, SlotTable
from text_generation_server.lora.step import LoraStep
from text_generation_server.lora.triton_lora import TritonLoraStep
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
    """FlashInfer segment GEMM (both backends) and the Triton decode kernels against the grouped
    torch path: mixed ranks 4-64 padded to 64, empty slots, base rows interleaved."""
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
    rng = np.random.default_rng(0)
    for tokens in (1, 7, 64, 300):
        names = np.array(rng.choice(["", *specs], size=tokens).tolist(), dtype=object)
        slots = np.array([slot_of[n] for n in names], dtype=np.int64)
        seg = TritonLoraStep(table, slots) if matmul is None else SegmentLoraStep(table, slots, matmul)
        ref = LoraStep(names, device_adapters, dev)
        for layer in range(CFG.num_layers):
            for proj, (out_f, in_f) in projection_shapes(CFG).items():
                x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
                y = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16)
                want = ref.apply(layer, proj, x, y).float()
                got = seg.apply(layer, proj, x, y.clone()).float()  # the Triton path adds in place
                delta = (want - y.float()).abs().max().item()
                # The paths round differently (the Triton kernels add an fp32 delta into y and round
                # once): allow an ulp of bf16 on y plus 2% of the delta.
                bound = 2.0**-7 * want.abs() + 0.02 * max(delta, 1.0)
                assert ((got - want).abs() <= bound).all(), (tokens, layer, proj)


def write_peft(path, cfg_dict, rank, targets, seed):
    """A PEFT directory with random non-zero weights for the GPU test model."""
    cfg = ModelConfig.from_dict(cfg_dict)
    shapes = projection_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            out_f, in_f = shapes[t]
            tensors[peft_key(layer, t, "A")] = torch.randn(rank, in_f, generator=g) * 0.05
            tensors[peft_key(layer, t, "B")] = torch.randn(out_f, rank, generator=g) * 0.05
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gpu")
    path, _ = write_model(root)
    cfg = json.loads((path / "config.json").read_text())
    write_peft(root / "src" / "a8", cfg, 8, PROJECTIONS, 1)
    write_peft(root / "src" / "b32", cfg, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 2)
    write_peft(root / "src" / "c16", cfg, 16, ("gate_proj", "up_proj", "down_proj"), 3)
    return path, root / "src"


def lora_engine(path, src, graphs, attention=None):
    e = Engine(EngineConfig(path, torch.bfloat16, torch.device("cuda"), block_size=BS, cuda_graphs=graphs,
                            attention=attention, adapter_source=src, max_active_adapters=4, max_lora_rank=32))
    e.warmup(batch(99, [[1, 2, 3]], 1), 256, max_total_tokens=512)
    return e


def run_with_adapters(engine, prompts, adapters, n):
    return run(engine, prompts, n, adapters)


@pytest.mark.parametrize("decode", ["triton", "segment"])
def test_lora_under_cuda_graphs_matches_eager_and_the_torch_path(lora_model, decode, monkeypatch):
    monkeypatch.setenv("TESSERA_LORA_DECODE", decode)
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
    # The segmented path against the grouped torch path (torch attention, no slot table): the
    # first token comes from the prefill; later ones may part only at a bf16 near-tie.
    ref = lora_engine(path, src, (), attention="torch")
    assert ref.adapters.slots is None
    t_r, lp_r = run_with_adapters(ref, PROMPTS, adapters, 16)
    for got, want, lg, lw in zip(t_g, t_r, lp_g, lp_r):
        assert got[0] == want[0] and abs(lg[0] - lw[0]) < 0.05
