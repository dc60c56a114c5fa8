"""Structured output on the shard: constrained rows sample only what their step's token mask
allows (the router's grammar), with overlapped steps too (a constrained batch's next forward goes
ahead but its sampling waits for the next call, which brings the masks, so each mask meets the
token it was computed for); the other rows' tokens do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import batch, write_tiny

VOCAB = 97


def mask_of(ids) -> bytes:
    bits = np.zeros(-(-VOCAB // 32) * 32, dtype=bool)
    bits[list(ids)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def allowed(rid: int, k: int) -> set[int]:
    """What request `rid` may produce as its k-th token: two ids that move with k."""
    return {(3 * k + rid) % 90 + 2, (7 * k + 2 * rid) % 90 + 2}


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


def drive(eng, constrained: bool) -> dict[int, list[int]]:
    """Router-like calls: three requests decode (request 1 constrained), then two more join in a
    step with the running rows (request 11 constrained). Masks are made from the tokens received
    so far, as the router makes them."""
    got: dict[int, list[int]] = {}
    eng.pending_seen = 0

    def masks():
        return {rid: mask_of(allowed(rid, len(got.get(rid, [])))) for rid in (1, 11)} if constrained else {}

    def record(res):
        assert not res.failed, res.failed
        eng.pending_seen += sum(b.pending is not None for b in eng.batches.values())
        for r, t in zip(res.request_ids, res.token_ids.tolist()):
            got.setdefault(r, []).append(int(t))

    a, nxt = batch(1, [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15]], 10)
    a.requests[1].constrained = constrained
    a.requests[2].parameters.watermark = True  # seeded by the token each row fed
    res, cached, _ = eng.step([], None, a, masks())
    record(res)
    for _ in range(3):
        res, cached, _ = eng.step([cached.id], None, None, masks())
        record(res)
    # request 3 hits a stop sequence: filtered while its batch's next forward may be pending
    cached = eng.filter(cached.id, [r for r in cached.request_ids if r != 3])
    b, _ = batch(2, [[20, 21, 22], [30, 31]], 6, first_block=nxt, first_id=10)
    b.requests[1].constrained = constrained
    res, cached, _ = eng.step([cached.id], None, b, masks())
    record(res)
    while cached is not None:
        res, cached, _ = eng.step([cached.id], None, None, masks())
        record(res)
    return got


@pytest.mark.parametrize("overlap", [False, True])
def test_constrained_rows_follow_their_masks_and_the_others_do_not_change(make_engine, overlap):
    free = drive(make_engine(overlap), constrained=False)
    eng = make_engine(overlap)
    bound = drive(eng, constrained=True)
    for rid in (1, 11):
        assert len(bound[rid]) == len(free[rid])
        for k, t in enumerate(bound[rid]):
            assert t in allowed(rid, k), (rid, k, t)
    assert bound[1] != free[1]  # the masks changed something
    for rid in (0, 2, 10):
        assert bound[rid] == free[rid], rid
    assert len(bound[3]) == 4  # filtered after its fourth token
    assert drive(make_engine(not overlap), constrained=True) == bound  # overlap changes nothing either
    # With overlap, the constrained batch's forwards went ahead, their sampling waiting for masks.
    assert (eng.pending_seen > 0) == overlap


def test_a_constrained_row_without_its_mask_is_refused(make_engine):
    from text_generation_server.errors import ShardError

    eng = make_engine(False)
    a, _ = batch(1, [[5, 6, 7]], 4)
    a.requests[0].constrained = True
    with pytest.raises(ShardError, match="no token mask for constrained requests \\[0\\]"):
        eng.step([], None, a, {})
    with pytest.raises(ShardError, match="allowing no token"):
        eng.step([], None, a, {0: mask_of([])})
