"""Overlapped steps on the GPU (CUDA graphs, FlashInfer, pinned copies, the plan's pinned buffer
reused while the previous step runs): the router-like script of `tests/shard_calls.py` reports the
same requests, tokens and finish reasons with overlap as without, for base and LoRA rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from text_generation_server.engine import Engine, EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shard_calls import BLOCK, batch, check_overlap  # noqa: E402

from test_lora_gpu import lora_model  # noqa: E402,F401 - the fixture


@pytest.mark.parametrize("graphs", [(1, 2, 4, 8), ()], ids=["graphs", "eager"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_overlapped_steps_report_what_plain_steps_do_on_the_gpu(lora_model, graphs, with_lora, monkeypatch):
    path, src = lora_model

    def make(overlap: bool, eos: int | None = None):
        monkeypatch.setenv("TESSERA_OVERLAP", "1" if overlap else "0")
        e = Engine(EngineConfig(path, torch.bfloat16, torch.device("cuda"), block_size=BLOCK, cuda_graphs=graphs,
                                adapter_source=src, max_active_adapters=4, max_lora_rank=32))
        e.warmup(batch(99, [[1, 2, 3]], 1)[0], 512, max_total_tokens=512)
        assert e.overlap is overlap and (e.graphs is not None) == bool(graphs)
        if eos is not None:
            e.eos = np.array([eos], dtype=np.int64)
        return e

    adapters = {0: "a8", 2: "b32", 10: "c16"} if with_lora else None
    check_overlap(make, rtol=0, atol=0, adapters=adapters)
