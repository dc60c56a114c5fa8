"""Overlapped steps (the next decode step launched before the current one's results are read):
what a router sees must not change. The same script of calls (prefills, decodes of concatenated
batches, filters for stop sequences and disconnects, rows ending by length and by EOS) runs with
overlap off and on; every call must report the same requests with the same tokens. The CPU runs
the same state machine as CUDA (launch, launch ahead, collect); only the waiting differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import batch, write_tiny
from shard_calls import check_overlap


@pytest.fixture
def make_engine(tmp_path, monkeypatch):
    from text_generation_server.engine import Engine, EngineConfig

    path, _ = write_tiny(tmp_path, "llama")

    def make(overlap: bool, eos: int | None = None):
        monkeypatch.setenv("TESSERA_OVERLAP", "1" if overlap else "0")
        eng = Engine(EngineConfig(path, torch.float32, torch.device("cpu"), block_size=4))
        warm, _ = batch(999, [[2, 3, 4]], 1)
        eng.warmup(warm, 256)
        assert eng.overlap is overlap
        if eos is not None:
            eng.eos = np.array([eos], dtype=np.int64)
        return eng

    return make


def test_overlapped_steps_report_what_plain_steps_do(make_engine):
    check_overlap(make_engine, rtol=1e-4, atol=1e-5)


def test_a_failed_launch_ahead_is_reported_by_the_next_decode(make_engine, monkeypatch):
    from text_generation_server.errors import ShardError

    eng = make_engine(True)
    a, _ = batch(1, [[5, 6, 7]], 6)
    _, cached = eng.prefill(a)
    boom = ShardError(6, "device fell over")

    def fail(*args, **kw):
        raise boom

    monkeypatch.setattr(eng, "_launch", fail)
    res, cached, _ = eng.decode([cached.id])  # the step launched at prefill; launching the next one fails
    assert res.request_ids == [0] and cached.request_ids == [0]
    with pytest.raises(ShardError, match="fell over"):
        eng.decode([cached.id])
    with pytest.raises(ShardError, match="not found"):
        eng.decode([cached.id])
