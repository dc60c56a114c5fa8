"""Shard-side batch state: concatenation and filtering keep every row's generation intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BLOCK, batch
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.errors import ShardError


def run_alone(eng, prompt, n, bid, first_block):
    b, _ = batch(bid, [prompt], n, first_block=first_block, first_id=bid * 100)
    res, _ = eng.prefill(b)
    out = [int(res.token_ids[0])]
    for _ in range(n - 1):
        res, _, _ = eng.decode([bid])
        out.append(int(res.token_ids[0]))
    eng.clear(bid)
    return out


def test_concatenate_and_filter_match_running_alone(engine_factory):
    eng, _ = engine_factory("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (4, 11, 6)]
    n = 8
    alone = [run_alone(eng, p, n, 10 + i, 0) for i, p in enumerate(prompts)]

    # Batch A = prompts 0, 1; batch B (prefilled two steps later) = prompt 2; then merge.
    a, nb = batch(1, prompts[:2], n, first_id=0)
    b, _ = batch(2, prompts[2:], n, first_block=nb, first_id=2)
    got = {0: [], 1: [], 2: []}

    def record(res):
        for rid, t in zip(res.request_ids, res.token_ids):
            got[rid].append(int(t))

    res, _ = eng.prefill(a)
    record(res)
    res, _, _ = eng.decode([1])
    record(res)
    res, _ = eng.prefill(b)
    record(res)
    # Drop request 1 after 4 tokens, keep going with 0 and 2.
    res, cached, _ = eng.decode([1, 2])
    record(res)
    assert cached.request_ids == [0, 1, 2]
    res, _, _ = eng.decode([1])
    record(res)
    kept = eng.filter(1, [2, 0])
    assert kept.request_ids == [2, 0]
    while len(got[0]) < n:
        res, _, _ = eng.decode([1])
        record(res)
    assert got[0] == alone[0]
    assert got[1] == alone[1][: len(got[1])]
    assert got[2] == alone[2][: len(got[2])]


def test_seeded_sampling_is_batch_independent(engine_factory):
    eng, _ = engine_factory("qwen2")
    prompts = [[5, 6, 7], [9, 10]]
    b1, nb = batch(1, prompts, 6, do_sample=True, temperature=0.9, seed=123)
    res, _ = eng.prefill(b1)
    first = [list(res.token_ids)]
    for _ in range(5):
        first.append(list(eng.decode([1])[0].token_ids))
    b2, _ = batch(2, prompts[1:], 6, first_block=nb, do_sample=True, temperature=0.9, seed=123)
    res, _ = eng.prefill(b2)
    second = [res.token_ids[0]]
    for _ in range(5):
        second.append(eng.decode([2])[0].token_ids[0])
    assert [r[1] for r in first] == second


def test_unknown_batch_and_request_are_typed_errors(engine_factory):
    eng, _ = engine_factory("llama")
    with pytest.raises(ShardError) as e:
        eng.decode([42])
    assert e.value.code.name == "BATCH_NOT_FOUND"
    b, _ = batch(1, [[3, 4]], 2)
    eng.prefill(b)
    with pytest.raises(ShardError) as e:
        eng.filter(1, [77])
    assert e.value.code.name == "INVALID_REQUEST"


def test_finished_rows_leave_the_batch_on_the_shard(engine_factory):
    """The shard drops the rows it ends itself (length here), so the router never has to filter them."""
    eng, _ = engine_factory("llama")
    b, _ = batch(1, [[3, 4, 5], [6, 7]], 3)
    b.requests[0].stopping_parameters.max_new_tokens = 1
    res, cached = eng.prefill(b)
    assert res.finish.tolist() == [1, 0] and cached.request_ids == [1]
    res, cached, _ = eng.decode([1])
    assert res.request_ids == [1] and cached.request_ids == [1]
    res, cached, _ = eng.decode([1])
    assert res.finish.tolist() == [1] and cached is None
    with pytest.raises(ShardError, match="not found"):
        eng.decode([1])


def test_running_past_the_block_table_is_refused(engine_factory):
    eng, _ = engine_factory("llama")
    b, _ = batch(1, [[3, 4, 5]], 2)
    eng.prefill(b)
    row = eng.batches[1]
    row.cache_lens = row.num_blocks * row.block_size  # as if steps had run past max_new_tokens
    with pytest.raises(ShardError, match="no room left in their KV blocks"):
        row.decode_inputs()


def test_bad_request_fails_alone(engine_factory):
    eng, _ = engine_factory("llama")
    b, _ = batch(1, [[3, 400], [3, 4, 5]], 2)  # request 0 has a token id beyond the vocabulary
    res, cached = eng.prefill(b)
    assert res.request_ids == [1]
    assert cached.request_ids == [1]
    assert res.failed == [(0, "token id out of vocabulary", 2)]
    b, _ = batch(2, [[3, 400]], 2, first_id=5)
    res, cached = eng.prefill(b)
    assert cached is None and res.failed[0][0] == 5


@pytest.mark.parametrize("cached, compute, sent", [(0, 3, 2), (0, 0, 3), (4, 4, 4)])
def test_a_chunk_carrying_other_than_its_tokens_is_refused(engine_factory, cached, compute, sent):
    """A chunk that does not finish its input (input_len 8 set) must carry exactly the tokens it
    computes, and must not reach the input's end."""
    eng, _ = engine_factory("llama")
    b, _ = batch(1, [list(range(2, 10)), [3, 4, 5]], 2)
    r = b.requests[0]
    r.input_len, r.cached_tokens, r.compute_tokens = 8, cached, compute
    ids, locs = list(r.input_ids), list(r.cache_locs)
    del r.input_ids[:], r.cache_locs[:]
    r.input_ids.extend(ids[cached:cached + sent]), r.cache_locs.extend(locs[cached:cached + sent])
    res, cached_batch = eng.prefill(b)
    assert cached_batch.request_ids == [1] and res.failed[0][0] == 0
    assert res.failed[0][1].startswith("a chunk that does not finish its input (8 tokens) carries exactly")


@pytest.mark.parametrize("field, why", [("blocks", "block ids beyond the cache's"),
                                        ("cache_locs", "cache locations beyond the cache's")])
def test_kv_places_outside_the_cache_are_refused(engine_factory, field, why):
    eng, _ = engine_factory("llama")
    b, _ = batch(1, [[3, 4, 5], [3, 4, 5]], 2)
    getattr(b.requests[0], field)[-1] = eng.num_blocks * (eng.cfg.block_size if field == "cache_locs" else 1)
    res, cached = eng.prefill(b)
    assert cached.request_ids == [1] and res.failed[0][0] == 0 and res.failed[0][1].startswith(why)


def test_prompt_logprobs_and_top_n(engine_factory):
    from text_generation_server.pb import generate_pb2 as pb

    eng, ref = engine_factory("llama")
    prompt = [5, 9, 11, 4]
    b, _ = batch(1, [prompt, [7, 8]], 2)
    b.requests[0].prefill_logprobs = True
    b.requests[0].top_n_tokens = 3
    res, _ = eng.prefill(b)
    ids, lps = res.prefill[0]
    assert ids == prompt and np.isnan(lps[0])
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    for t in range(1, len(prompt)):
        assert abs(lps[t] - want[t - 1, prompt[t]].item()) < 1e-4
    assert 1 not in res.prefill
    top = res.top_ids[0, :3]
    assert top[0] == res.token_ids[0]  # greedy: the best alternative is the token itself
    assert list(res.top_logprobs[0, :3]) == sorted(res.top_logprobs[0, :3], reverse=True)


def test_page_tables_built_ahead_match_a_fresh_build(engine_factory):
    """The next step's page CSR, built while the GPU runs the current one, is used only while
    the batch is unchanged, and equals what the step would build itself."""
    from text_generation_server.attention.paged_meta import paged_kv_metadata

    eng, _ = engine_factory("llama")
    b, _ = batch(1, [[3, 4, 5, 6, 7], [8, 9]], 6)
    eng.prefill(b)
    live = eng.batches[1]
    live.prepare_decode_host()
    ahead = live.decode_inputs().attention
    fresh = paged_kv_metadata(ahead.kv_lens_host, live.block_tables_host, live.block_size)
    assert ahead.paged_host is not None
    for x, y in zip(ahead.paged_host, fresh):
        np.testing.assert_array_equal(x, y)
    live.advance(live.last_tokens, np.ones(2, dtype=np.int64))  # the batch moved on: stale
    assert live.decode_inputs().attention.paged_host is None
    kept = live.filter([1])
    kept.prepare_decode_host()
    assert kept.decode_inputs().attention.paged_host[0].tolist() == [0, 1]  # one row: 3 cached + 1 = one 4-token page


def test_every_per_row_field_is_reshaped(engine_factory):
    """filter/concatenate reshape fields by the names in HOST_ROWS / COUNT_ROWS: a per-row field
    missing from them would keep the old rows after a filter."""
    import dataclasses

    from text_generation_server.batch import COUNT_ROWS, HOST_ROWS, Batch

    handled = set(HOST_ROWS) | set(COUNT_ROWS) | {
        "id", "request_ids", "block_tables", "block_tables_host", "last_tokens", "sampling", "block_size",
        "prompt_ids", "prompt_cache_locs", "prompt_ends", "prefill_logprobs",  # pending prompts: stacked by concatenate, gone after the step
        "next_host",  # rebuilt each step
        "ahead", "ahead_error",  # a launched step: carried whole, its rows picked by request id when collected
        "pending",  # a forward whose sampling waits for masks: its rows sliced by filter (Forwarded.select)
    }
    assert {f.name for f in dataclasses.fields(Batch)} == handled


def test_a_cached_prefix_is_read_not_recomputed(engine_factory):
    """A prompt whose first blocks hold another request's keys/values (the router's prefix
    cache) computes only the rest and decodes exactly as if it had computed everything."""
    from shard_calls import request

    eng, _ = engine_factory("llama")
    shared = [5, 9, 11, 4, 7, 7, 30, 2]  # two full blocks of 4
    a, nxt = request(0, shared + [3, 3, 8], 4, 0)
    eng.prefill(pb.Batch(id=1, requests=[a]))
    b, _ = request(1, shared + [12, 40, 41, 6, 2], 6, nxt)
    b.blocks[:2] = a.blocks[:2]  # the shared blocks by reference
    b.cache_locs[:] = [b.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(len(b.input_ids))]
    b.cached_tokens = 8
    fresh, _ = request(2, list(b.input_ids), 6, 100)

    def run(r, bid):
        res, cached = eng.prefill(pb.Batch(id=bid, requests=[r]))
        toks, lps = [int(res.token_ids[0])], [float(res.logprobs[0])]
        while cached is not None:
            res, cached, _ = eng.decode([bid])
            toks.append(int(res.token_ids[0]))
            lps.append(float(res.logprobs[0]))
        return toks, lps

    got, want = run(b, 2), run(fresh, 3)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached, compute, logprobs, why", [
    (4, 10, False, "stay within the prompt"), (12, 0, False, "leave a prompt token"),
    (8, 0, True, "prompt logprobs"), (0, 5, True, "no chunks")])
def test_a_bad_cached_prefix_or_chunk_fails_alone(engine_factory, cached, compute, logprobs, why):
    from shard_calls import request

    eng, _ = engine_factory("llama")
    r, _ = request(0, list(range(2, 14)), 2, 0)
    r.cached_tokens, r.compute_tokens, r.prefill_logprobs = cached, compute, logprobs
    ok, _ = request(1, [3, 4], 2, 10)
    res, _ = eng.prefill(pb.Batch(id=1, requests=[r, ok]))
    assert res.request_ids == [1] and why in res.failed[0][1]


def run_rows(eng, batch_pb, grants_at=None):
    """Tokens per request until every row ends; `grants_at(step, cached)` -> blocks to grant."""
    res, cached = eng.prefill(batch_pb)
    out = {r: [int(t)] for r, t in zip(res.request_ids, res.token_ids)}
    step = 0
    while cached is not None:
        grants = grants_at(step, cached) if grants_at else None
        res, cached, _ = eng.decode([cached.id], grants)
        for r, t in zip(res.request_ids, res.token_ids):
            out[r].append(int(t))
        step += 1
    return out


def test_blocks_granted_as_the_sequence_grows(engine_factory):
    """KV on demand: a request admitted with blocks for its prompt (+1) decodes as far as the
    blocks granted with each step take it, token for token as one given every block at once."""
    from shard_calls import request

    eng, _ = engine_factory("llama")
    full, _ = request(0, [5, 9, 11, 4, 7], 12, 0)
    want = run_rows(eng, pb.Batch(id=1, requests=[full]))[0]
    lean, _ = request(1, [5, 9, 11, 4, 7], 12, 50)
    spare = list(lean.blocks[2:])
    del lean.blocks[2:]  # 8 positions: the prompt and three more

    def grant(step, cached):
        # before the step that feeds position 5 + step + 1 > capacity: one more block
        have = len(eng.batches[cached.id].block_tables_host[0][:int(eng.batches[cached.id].num_blocks[0])])
        return {1: [spare.pop(0)]} if 5 + step + 1 >= have * BLOCK and spare else None

    assert run_rows(eng, pb.Batch(id=2, requests=[lean]), grant)[1] == want
    r, _ = request(3, [5, 9], 4, 90)
    eng.prefill(pb.Batch(id=3, requests=[r]))
    with pytest.raises(ShardError, match="not in these batches"):
        eng.decode([3], {77: [120]})


def test_a_preempted_request_resumes_where_it_was(engine_factory):
    """Recompute after preemption: prompt + the tokens generated so far as input, with
    generated_tokens saying which are outputs: seeded sampling with penalties continues exactly
    (same noise counter, same output counts, same max_new_tokens)."""
    from shard_calls import request

    eng, _ = engine_factory("llama")
    kw = dict(do_sample=True, temperature=0.9, top_k=30, seed=11)
    whole, _ = request(0, [5, 9, 11, 4, 7], 10, 0, **kw)
    whole.parameters.frequency_penalty = 0.7
    want = run_rows(eng, pb.Batch(id=1, requests=[whole]))[0]
    k = 4
    resumed, _ = request(0, [5, 9, 11, 4, 7] + want[:k], 10, 50, **kw)
    resumed.parameters.frequency_penalty = 0.7
    resumed.generated_tokens = k
    got = run_rows(eng, pb.Batch(id=2, requests=[resumed]))[0]
    assert got == want[k:]
