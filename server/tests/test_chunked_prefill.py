"""Chunked prefill in mixed steps: long prompts computed a few tokens per step, in the same
forward as other requests' decode rows (the router's token budget), must produce what each
request produces alone: same tokens (greedy, penalties, seeded sampling), same logprobs within
float tolerance; with overlapped steps on and off (with overlap the chunks ride on the step
launched ahead)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import batch, write_tiny
from shard_calls import alone, chunked_script, request


@pytest.fixture
def make_engine(tmp_path, monkeypatch):
    from text_generation_server.engine import Engine, EngineConfig

    path, _ = write_tiny(tmp_path, "llama")

    def make(overlap: bool):
        monkeypatch.setenv("TESSERA_OVERLAP", "1" if overlap else "0")
        eng = Engine(EngineConfig(path, torch.float32, torch.device("cpu"), block_size=4))
        warm, _ = batch(999, [[2, 3, 4]], 1)
        eng.warmup(warm, 256)
        return eng

    return make


def reference(eng) -> dict[int, tuple[list[int], list[float]]]:
    """The script's four requests, each alone."""
    a, nxt = batch(1, [[5, 6, 7, 8], [9, 10]], 14)
    c, nxt2 = request(20, [(3 * i) % 90 + 2 for i in range(23)], 6, nxt)
    d, _ = request(21, [(7 * i) % 90 + 2 for i in range(17)], 6, nxt2)
    c.parameters.repetition_penalty = 1.2
    d.parameters.do_sample, d.parameters.seed, d.parameters.temperature = True, 3, 0.9
    return {r.id: alone(eng, r) for r in [*a.requests, c, d]}


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("chunk", [3, 5, 8, 64])
def test_chunks_in_mixed_steps_match_each_request_alone(make_engine, overlap, chunk):
    want = reference(make_engine(False))
    got = chunked_script(make_engine(overlap), chunk)
    assert sorted(got) == sorted(want)
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        np.testing.assert_allclose(got[rid][1], want[rid][1], rtol=1e-4, atol=1e-5)


def test_a_partial_chunk_returns_nothing_and_joins_nothing(make_engine):
    from text_generation_server.pb import generate_pb2 as pb

    eng = make_engine(False)
    r, _ = request(3, list(range(2, 22)), 4, 0)
    r.compute_tokens = 8
    res, cached = eng.prefill(pb.Batch(id=5, requests=[r]))
    assert res.request_ids == [] and not res.failed and cached is None
    assert 5 not in eng.batches
