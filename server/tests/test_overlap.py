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


def script(eng, eos_row_token: int | None = None):
    """Runs a router-like sequence of calls; returns what each call reported, in order:
    [(call, {request id: (token, finish)}), ...] and the logprobs per request."""
    calls, lps = [], {}

    def record(name, res):
        calls.append((name, {r: (int(t), int(f)) for r, t, f in zip(res.request_ids, res.token_ids, res.finish)}))
        for r, lp in zip(res.request_ids, res.logprobs):
            lps.setdefault(r, []).append(float(lp))

    a, nxt = batch(1, [[5, 6, 7, 8], [9, 10], [11, 12, 13]], 12)
    a.requests[1].parameters.do_sample = True
    a.requests[1].parameters.temperature = 0.8
    a.requests[1].parameters.top_k = 20
    a.requests[1].parameters.seed = 42
    a.requests[2].parameters.repetition_penalty = 1.3
    a.requests[2].stopping_parameters.max_new_tokens = 5
    if eos_row_token is not None:
        a.requests[0].stopping_parameters.ignore_eos_token = False
    res, cached = eng.prefill(a)
    record("prefill a", res)
    for i in range(3):
        res, cached, _ = eng.decode([cached.id])
        record(f"decode {i}", res)
    # request 1 hits a stop sequence (the router's call): filtered out
    cached = eng.filter(cached.id, [r for r in cached.request_ids if r != 1])
    b, _ = batch(2, [[20, 21, 22, 23, 24], [30]], 9, first_block=nxt, first_id=10)
    b.requests[1].parameters.do_sample = True
    b.requests[1].parameters.seed = 7
    b.requests[1].top_n_tokens = 3
    res, cached_b = eng.prefill(b)
    record("prefill b", res)
    ids = [cached.id, cached_b.id]
    for i in range(3):
        res, cached, _ = eng.decode(ids)
        record(f"decode ab {i}", res)
        ids = [cached.id]
    # request 11's client went away
    cached = eng.filter(cached.id, [r for r in cached.request_ids if r != 11])
    while cached is not None:
        res, cached, _ = eng.decode([cached.id])
        record("decode", res)
    return calls, lps


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
    plain, _ = script(make_engine(False))
    eos = dict(plain)["decode 2"][0][0]  # an EOS for request 0: the token of its fourth step
    plain, plain_lp = script(make_engine(False, eos), eos)
    over, over_lp = script(make_engine(True, eos), eos)
    assert [c[0] for c in over] == [c[0] for c in plain]
    for (name, p), (_, o) in zip(plain, over):
        assert o == p, name
    for r in plain_lp:
        np.testing.assert_allclose(over_lp[r], plain_lp[r], rtol=1e-4, atol=1e-5)
    ended = {r: f for _, c in plain for r, (_, f) in c.items() if f}
    assert ended[0] == 2 and ended[2] == 1  # EOS and length both exercised
    names = [name for name, _ in over]
    # a filtered request never gets another token, though its next step had been launched
    assert all(1 not in c for _, c in over[names.index("decode 2") + 1:])
    assert all(11 not in c for _, c in over[names.index("decode ab 2") + 1:])
    assert any(11 in c for _, c in over[: names.index("decode ab 2") + 1])


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
