"""The adapter pool (registry, residency, paths, threads) and the segmented LoRA step's layout
(row order, segment offsets, padding, pre-scaled B), checked against the grouped torch path."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.lora.adapter import GROUPS, peft_key, projection_shapes, write_random_adapter
from text_generation_server.lora.pool import AdapterPool
from text_generation_server.lora.segment import SegmentLoraStep, torch_segment_matmul
from text_generation_server.lora.slots import SlotTable
from text_generation_server.lora.step import LoraStep
from text_generation_server.models.config import ModelConfig

CFG = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 32,
                             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "max_position_embeddings": 64})


def write_adapter(d, rank, targets=("q_proj", "v_proj"), alpha=None, rslora=False, seed=0, cfg=CFG):
    """A PEFT directory with random non-zero weights for the model of `cfg`."""
    return write_random_adapter(d, cfg, rank, targets, torch.Generator().manual_seed(seed), 0.3, alpha=alpha,
                                use_rslora=rslora, target_modules=list(targets))


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "adapters"
    write_adapter(src / "a4", 4, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)
    write_adapter(src / "a8", 8, ("gate_proj", "up_proj", "down_proj"), seed=2)
    write_adapter(src / "a16", 16, ("q_proj", "down_proj"), rslora=True, seed=3)
    write_adapter(src / "a2", 2, seed=4)
    (tmp_path / "outside").mkdir()
    write_adapter(tmp_path / "outside" / "x", 4, seed=5)
    return src


def pool(source, max_active=8, slots=None):
    return AdapterPool(CFG, torch.float32, torch.device("cpu"), {}, source, max_active, slots)


def test_lru_eviction_never_drops_pinned(source):
    p = pool(source, max_active=2)
    p.load("a4")
    p.load("a8")
    p.load("a4")  # a8 is now least recently used
    p.load("a16", pinned=lambda: frozenset({"a8"}))  # ...but pinned: a4 goes
    assert set(p.active) == {"a8", "a16"} and p.loads == 3 and p.evictions == 1


def test_known_lists_source_and_residency(source):
    p = pool(source)
    p.load("a8")
    known = {n: (rank, resident) for n, rank, resident, _ in p.known()}
    assert known == {"a2": (2, False), "a4": (4, False), "a8": (8, True), "a16": (16, False)}


def _load_error(p, name):
    with pytest.raises(ShardError) as e:
        p.load(name)
    return e.value


def test_files_linked_outside_the_source_are_never_opened(source, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"peft_type": "TOP SECRET"}')
    d = write_adapter(source / "linked", 4)
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to(secret)
    e = _load_error(pool(source), "linked")
    assert e.code == ErrorCode.BAD_ADAPTER and "outside the adapter source" in e.message
    assert "SECRET" not in e.message
    d2 = write_adapter(source / "linked2", 4)
    (d2 / "adapter_model.safetensors").unlink()
    (d2 / "adapter_model.safetensors").symlink_to("/etc/passwd")
    assert "outside the adapter source" in _load_error(pool(source), "linked2").message
    # A link to a file inside the source is fine.
    d3 = write_adapter(source / "inside", 4)
    (d3 / "adapter_config.json").unlink()
    (d3 / "adapter_config.json").symlink_to(source / "a4" / "adapter_config.json")
    pool(source).load("inside")
    names = [n for n, *_ in pool(source).known()]
    assert "inside" in names and "linked" not in names and "linked2" not in names


@pytest.mark.parametrize("conf, why", [
    ({"peft_type": "LORA", "r": "abc"}, "`r` (the rank) must be an integer from 1 to 256, got a string"),
    ({"peft_type": "LORA", "r": 4.5}, "`r` (the rank) must be an integer"),
    ({"peft_type": "LORA", "r": 0}, "`r` (the rank) must be from 1 to 256, got 0"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": "x"}, "`lora_alpha` must be a finite number"),
    ({"peft_type": "LORA", "r": 4, "use_rslora": "yes"}, "`use_rslora` must be true or false"),
    ({"peft_type": "LORA", "r": 4, "use_dora": True}, "DoRA"),
    ({"peft_type": "LORA", "r": 4, "fan_in_fan_out": True}, "`fan_in_fan_out` must be false"),
    ({"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj": 3}}, "`alpha_pattern` must be empty"),
    ({"peft_type": "IA3", "r": 4}, "`peft_type` must be \"LORA\", got 'IA3'"),
    ({"peft_type": "root:x:0:0", "r": 4}, "a string that is not a PEFT type"),
    ([1, 2, 3], "must hold a JSON object, not a list"),
])
def test_bad_configs_are_bad_adapter_with_a_clear_message(source, conf, why):
    d = write_adapter(source / "broken", 4)
    (d / "adapter_config.json").write_text(json.dumps(conf))
    e = _load_error(pool(source), "broken")
    assert e.code == ErrorCode.BAD_ADAPTER and why in e.message, e.message
    usable, unusable = pool(source).listing()
    assert "broken" not in [n for n, *_ in usable]
    assert [why for n, why in unusable if n == "broken"] == [e.message]  # named, to explain a request for it


def test_unreadable_files_are_bad_adapter_without_echoing_them(source):
    d = write_adapter(source / "garbage", 4)
    (d / "adapter_config.json").write_text("not json: hunter2")
    e = _load_error(pool(source), "garbage")
    assert e.code == ErrorCode.BAD_ADAPTER and "not valid JSON" in e.message and "hunter2" not in e.message
    d = write_adapter(source / "garbage2", 4)
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{hunter2 1234567}")
    e = _load_error(pool(source), "garbage2")
    assert e.code == ErrorCode.BAD_ADAPTER and "hunter2" not in e.message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_bad_adapter_and_unlisted_after(source, value):
    d = write_adapter(source / "nan", 4)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = peft_key(1, "v_proj", "B")
    tensors[key][3, 1] = value
    save_file(tensors, str(d / "adapter_model.safetensors"))
    p = pool(source)
    assert "nan" in [n for n, *_ in p.known()]  # the header looks fine: listed until it fails to load
    e = _load_error(p, "nan")
    assert e.code == ErrorCode.BAD_ADAPTER and "layer 1 v_proj: lora_B holds NaN or infinite values" in e.message
    assert "nan" not in [n for n, *_ in p.known()]
    write_adapter(source / "nan2", 4)
    (source / "nan").rename(source / "old")
    (source / "nan2").rename(source / "nan")  # fixed files: listed and loadable again
    assert "nan" in [n for n, *_ in p.known()]
    p.load("nan")


def test_paths_with_nul_are_invalid(source):
    with pytest.raises(ShardError) as e:
        pool(source).source_path("a4\0x")
    assert e.value.code == ErrorCode.INVALID_REQUEST and "NUL" in e.value.message


def test_paths_only_inside_the_source(source, tmp_path):
    p = pool(source)
    assert p.source_path("a4") == (source / "a4").resolve()
    assert p.source_path(str(source / "a8")) == (source / "a8").resolve()  # absolute, but inside
    for bad in ("../outside/x", str(tmp_path / "outside" / "x"), "/etc", "."):
        with pytest.raises(ShardError) as e:
            p.source_path(bad)
        assert e.value.code == ErrorCode.INVALID_REQUEST and "outside" in e.value.message
    with pytest.raises(ShardError) as e:
        p.source_path("missing")
    assert e.value.code == ErrorCode.ADAPTER_NOT_FOUND
    with pytest.raises(ShardError) as e:
        pool(None).source_path("a4")
    assert e.value.code == ErrorCode.INVALID_REQUEST


def test_register_validates_and_unload_forgets(source):
    p = pool(None)
    p.register("mine", (source / "a4").resolve())
    assert [n for n, *_ in p.known()] == ["mine"] and not p.active
    p.load("mine")
    p.unload("mine", forget=False)
    assert not p.active and "mine" in p.static
    p.unload("mine", forget=True)
    assert p.known() == []
    with pytest.raises(ShardError) as e:
        p.unload("mine", forget=True)
    assert e.value.code == ErrorCode.ADAPTER_NOT_FOUND
    (source / "broken").mkdir()
    (source / "broken" / "adapter_config.json").write_text("{not json")
    (source / "broken" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ShardError) as e:
        p.register("broken", source / "broken")
    assert e.value.code == ErrorCode.BAD_ADAPTER and "broken" not in p.static


def test_concurrent_loads_of_one_adapter_read_it_once(source):
    p = pool(source)
    threads = [threading.Thread(target=p.load, args=("a16",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.loads == 1 and list(p.active) == ["a16"]


def test_slot_table_rank_limit_is_a_bad_adapter(source):
    table = SlotTable(CFG, torch.float32, torch.device("cpu"), 2, max_rank=12)
    assert table.max_rank == 16  # a power of two, at least 16, for the decode kernels
    write_adapter(source / "a32", 32, seed=6)
    with pytest.raises(ShardError) as e:
        pool(source, slots=table).load("a32")
    assert e.value.code == ErrorCode.BAD_ADAPTER and "max-lora-rank" in e.value.message


def test_slots_are_reused_after_eviction(source):
    table = SlotTable(CFG, torch.float32, torch.device("cpu"), 2, max_rank=16)
    p = pool(source, max_active=2, slots=table)
    s4, s8 = p.load("a4").slot, p.load("a8").slot
    assert {s4, s8} == {1, 2}
    assert p.load("a16").slot == s4  # a4 was least recently used: its slot is rewritten
    a, b = table.weights(0, "k_proj")
    assert torch.count_nonzero(a[s4]) == 0 and torch.count_nonzero(b[s4]) == 0  # a16 has no k_proj: the old a4 weights are gone


def test_segmented_step_matches_grouped_torch(source):
    """Mixed ranks (2..16) and targets, base rows interleaved, padding to max rank, pre-scaled B."""
    table = SlotTable(CFG, torch.float32, torch.device("cpu"), 4, max_rank=16)
    p = pool(source, max_active=4, slots=table)
    names = ["a4", "a8", "a16", "a2"]
    resident = {n: p.load(n) for n in names}
    ref_pool = pool(source)
    ref = {n: ref_pool.load(n).adapter for n in names}
    rng = np.random.default_rng(0)
    token_adapters = np.array(rng.choice(["", *names], size=23).tolist(), dtype=object)
    slot_of = {"": 0, **{n: r.slot for n, r in resident.items()}}
    slots = np.array([slot_of[a] for a in token_adapters], dtype=np.int64)
    seg = SegmentLoraStep(table, slots, torch_segment_matmul)
    grouped = LoraStep(token_adapters, ref, torch.device("cpu"))
    shapes = projection_shapes(CFG)
    for layer in range(CFG.num_layers):
        for group in GROUPS:
            x = torch.randn(23, shapes[group[0]][1])
            ys = [torch.randn(23, shapes[p][0]) for p in group]
            for got, want in zip(seg.apply(layer, group, x, ys), grouped.apply(layer, group, x, ys)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert seg.indptr_host[-1] == 23 and (np.diff(seg.indptr_host) == np.bincount(slots, minlength=5)).all()


def test_segmented_step_fills_static_buffers(source):
    table = SlotTable(CFG, torch.float32, torch.device("cpu"), 2, max_rank=8)
    perm, indptr = torch.zeros(8, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    step = SegmentLoraStep(table, np.array([2, 0, 1, 2, 0]), torch_segment_matmul, perm, indptr)
    assert perm[:5].tolist() == [1, 4, 2, 0, 3] and indptr.tolist() == [0, 2, 3, 5]
    assert step.perm.data_ptr() == perm.data_ptr()


def test_the_lora_kernels_are_one_typed_choice():
    from text_generation_server.lora.kernels import TritonKernels, make_slot_kernels

    table = SlotTable(CFG, torch.float32, torch.device("cpu"), 3, max_rank=16)
    kernels = make_slot_kernels("triton", table)
    assert isinstance(kernels, TritonKernels) and kernels.name == "triton"
    a, b = kernels.graph_step(np.zeros(8, dtype=np.int64)), kernels.graph_step(np.array([1, 0, 0, 2, 0, 0, 0, 0]))
    assert a.plan is b.plan, "a bucket's replays refill one static plan buffer"
    assert kernels.graph_step(np.zeros(4, dtype=np.int64)).plan is not a.plan
    assert kernels.step(np.array([1, 1, 0]), prefill=True).block_m > kernels.step(np.array([1]), prefill=False).block_m
    with pytest.raises(ValueError, match="unknown LoRA kernels"):
        make_slot_kernels("cublas", table)


def test_segment_kernels_launch_their_gemm_at_warmup(monkeypatch):
    """FlashInfer builds its segment GEMM on first use (minutes on a fresh Hopper machine):
    compile() launches it for every projection group at warmup, in the serving dtype, on a
    scratch output, leaving the slot table as it was (FlashInfer stood in for by the reference)."""
    from text_generation_server.lora import segment
    from text_generation_server.lora.kernels import make_slot_kernels

    calls = []

    class Recording:
        def __init__(self, device, backend):
            pass

        def __call__(self, x, w, n, indptr, indptr_host):
            calls.append((x.dtype, w.dtype))
            return torch_segment_matmul(x, w, n, indptr, indptr_host)

    monkeypatch.setattr(segment, "FlashInferSegmentMatmul", Recording)
    table = SlotTable(CFG, torch.bfloat16, torch.device("cpu"), 3, max_rank=16)
    before = [t.clone() for d in (table.a, table.b) for t in d.values()]
    make_slot_kernels("segment", table).compile(torch.bfloat16)
    assert len(calls) == sum(1 + len(g) for g in table.groups)  # a shrink per group, an expand per projection
    assert set(calls) == {(torch.bfloat16, torch.bfloat16)}
    assert all(torch.equal(b, t) for b, t in zip(before, [t for d in (table.a, table.b) for t in d.values()]))


def test_peft_keys_name_the_module_that_holds_the_projection():
    assert peft_key(2, "q_proj", "A") == "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    assert peft_key(0, "qkv_proj", "B") == "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    assert peft_key(1, "down_proj", "A") == "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    # Phi-3's fused gate/up lives under mlp, as peft saves it.
    assert peft_key(1, "gate_up_proj", "B") == "base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"
