"""The Triton LoRA kernels' tile plan, and the kernels themselves run by Triton's interpreter on the
CPU against the grouped torch path (the GPU suite runs them compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from text_generation_server.lora.triton_lora import block_n, plan_tiles


def test_plan_groups_rows_by_slot_in_tiles_and_skips_base_rows():
    slots = np.array([3, 0, 5, 3, 3, 0, 5, 3, 3])
    plan, n = plan_tiles(slots, block_m=2, size=12)
    assert plan.shape == (4, 12) and plan.dtype == np.int32
    order = plan[0, :9]
    assert sorted(order.tolist()) == list(range(9))
    assert slots[order].tolist() == [0, 0, 3, 3, 3, 3, 3, 5, 5]
    assert n == 4  # slot 3: five rows in tiles of 2, 2, 1; slot 5: one tile of 2
    assert plan[1, :n].tolist() == [2, 4, 6, 7] and plan[2, :n].tolist() == [2, 2, 1, 2]
    assert plan[3, :n].tolist() == [3, 3, 3, 5]
    assert not plan[2, n:].any(), "tiles past the last are empty (the kernels return at once)"
    assert (order[[2, 3, 4, 5, 6]] == [0, 3, 4, 7, 8]).all(), "rows keep their order within a slot"


def test_plan_of_a_base_only_or_empty_step_has_no_tiles():
    assert plan_tiles(np.zeros(5, dtype=np.int64), 16)[1] == 0
    plan, n = plan_tiles(np.zeros(0, dtype=np.int64), 16, size=4)
    assert n == 0 and not plan.any()


def test_expand_blocks_never_straddle_two_projections():
    assert block_n([0, 4096, 5120, 6144]) == 128
    assert block_n([0, 576, 768, 960]) == 64
    assert block_n([0, 4096]) == 128
    with pytest.raises(ValueError, match="multiples of 16"):
        block_n([0, 40, 60])


def test_kernels_match_the_grouped_torch_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked" in r.stdout


def _interpreted() -> None:
    """Mixed ranks (2..16) and targets, base rows interleaved, decode and prefill tiles, split and
    whole input dimensions, and a plan buffer larger than the step (as in a CUDA graph); fused
    outputs updated in place."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lora import CFG, write_adapter

    from text_generation_server.lora.adapter import GROUPS, projection_shapes
    from text_generation_server.lora.pool import AdapterPool
    from text_generation_server.lora.slots import SlotTable
    from text_generation_server.lora.step import LoraStep
    from text_generation_server.lora.triton_lora import TritonLoraStep, Tuning, compile_kernels

    with tempfile.TemporaryDirectory() as d:
        src = Path(d)
        write_adapter(src / "a4", 4, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)
        write_adapter(src / "a8", 8, ("gate_proj", "up_proj", "down_proj"), seed=2)
        write_adapter(src / "a16", 16, ("q_proj", "down_proj"), rslora=True, seed=3)
        write_adapter(src / "a2", 2, ("v_proj", "up_proj"), seed=4)
        names = ["a4", "a8", "a16", "a2"]
        table = SlotTable(CFG, torch.float32, torch.device("cpu"), 5, max_rank=16)
        pool = AdapterPool(CFG, torch.float32, torch.device("cpu"), {}, src, 5, table)
        ref_pool = AdapterPool(CFG, torch.float32, torch.device("cpu"), {}, src, 5)
        slot_of = {"": 0, **{n: pool.load(n).slot for n in names}}
        ref = {n: ref_pool.load(n).adapter for n in names}
        shapes = projection_shapes(CFG)
        rng = np.random.default_rng(0)
        checked = 0
        # (rows, rows per tile, padding rows, tuning): k_split 16 splits K in 2-3; with padding, as
        # in a CUDA graph, programs=1 makes one program walk every tile and, with 16-column blocks,
        # loop over the blocks of a chunk
        for tokens, block_m, pad, tuning in ((1, 16, 0, Tuning()), (9, 16, 7, Tuning(k_split=16)), (40, 16, 0, Tuning()),
                                             (40, 16, 8, Tuning(programs=1, block_n=16)), (70, 64, 0, Tuning(k_split=16))):
            rows = np.array(rng.choice(["", *names], size=tokens).tolist(), dtype=object)
            if tokens == 70:
                rows = np.repeat(["a8", "", "a4", "a16"], [30, 10, 20, 10]).astype(object)  # prompts
            slots = np.array([slot_of[n] for n in rows], dtype=np.int64)
            buf = torch.zeros(4, tokens + pad, dtype=torch.int32) if pad else None
            if pad:
                slots = np.concatenate([slots, np.zeros(pad, dtype=np.int64)])
            step = TritonLoraStep(table, slots, block_m, buf, tuning)
            want_step = LoraStep(rows, ref, torch.device("cpu"))
            for layer in range(CFG.num_layers):
                for group in GROUPS:
                    x = torch.randn(len(slots), shapes[group[0]][1])
                    fused = torch.randn(len(slots), sum(shapes[p][0] for p in group))
                    ys = list(fused.split([shapes[p][0] for p in group], dim=1))
                    want = want_step.apply(layer, group, x[:tokens], [y[:tokens].clone() for y in ys])
                    before = fused.clone()
                    got = step.apply(layer, group, x, ys)
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g[:tokens], w, rtol=1e-4, atol=1e-4)
                    assert torch.equal(fused[tokens:], before[tokens:]), "padding rows untouched"
                    base = torch.from_numpy(slots[:tokens] == 0)
                    assert torch.equal(fused[:tokens][base], before[:tokens][base]), "base rows untouched"
                    checked += 1
        before = [t.clone() for d in (table.a, table.b) for t in d.values()]
        compile_kernels(table, torch.float32)  # reads slot 1 (times zero inputs), writes only scratch outputs
        assert all(torch.equal(b, t) for b, t in zip(before, [t for d in (table.a, table.b) for t in d.values()]))
        print("checked", checked)


if __name__ == "__main__":
    _interpreted()
