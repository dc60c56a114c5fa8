"""Shard calls the way the router makes them, for tests on the CPU and the GPU (tests_gpu puts this
directory on sys.path): request builders, and a router-like script of calls."""

from __future__ import annotations

import numpy

from text_generation_server.pb import generate_pb2 as pb

BLOCK = 4


def request(rid: int, ids: list[int], max_new: int, first_block: int, *, temperature=1.0, top_k=0, top_p=1.0,
            do_sample=False, seed=0, rep=1.0, ignore_eos=True) -> tuple[pb.Request, int]:
    n = -(-(len(ids) + max_new) // BLOCK)
    blocks = list(range(first_block, first_block + n))
    locs = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(len(ids))]
    params = pb.NextTokenChooserParameters(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                                           seed=seed, repetition_penalty=rep, typical_p=1.0)
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos)
    return pb.Request(id=rid, input_ids=ids, parameters=params, stopping_parameters=stop, blocks=blocks,
                      cache_locs=locs), first_block + n


def batch(bid: int, prompts: list[list[int]], max_new: int, first_block: int = 0, first_id: int = 0, **kw):
    reqs = []
    for i, ids in enumerate(prompts):
        r, first_block = request(first_id + i, ids, max_new, first_block, **kw)
        reqs.append(r)
    return pb.Batch(id=bid, requests=reqs, size=len(reqs)), first_block


def name_adapters(b: pb.Batch, adapters: dict[int, str] | None) -> None:
    for r in b.requests:
        if adapters and r.id in adapters:
            r.adapter_id = adapters[r.id]


def generate(eng, pb_batch: pb.Batch, n: int) -> list[list[int]]:
    """Each row's first n tokens: the batch's prefill, then n - 1 decode steps of it."""
    res, cached = eng.prefill(pb_batch)
    got = [[int(t)] for t in res.token_ids]
    for _ in range(n - 1):
        res, cached, _ = eng.decode([cached.id])
        for row, t in enumerate(res.token_ids):
            got[row].append(int(t))
    return got


def prompt_logits(eng, ids: list[int]):
    """The logits [len(ids), vocab] of every position of one prompt: one forward on the engine's
    model and cache (batch id 1, blocks from 0)."""

    from text_generation_server.batch import Batch
    from text_generation_server.models.forward_context import ForwardContext, forward_context

    pb_batch, _ = batch(1, [ids], 1)
    b = Batch.from_pb(pb_batch.id, list(pb_batch.requests), eng.cfg.block_size, eng.model.config.vocab_size,
                      eng.cfg.device, eng.long_rope)
    inputs = b.prefill_inputs()
    eng.attention.plan(inputs.attention)
    with forward_context(ForwardContext(eng.attention)):
        hidden = eng.model.forward(inputs.input_ids, inputs.positions, eng.cache.k, eng.cache.v)
    return eng.model.compute_logits(hidden)


def overlap_script(eng, eos_row_token: int | None = None, adapters: dict[int, str] | None = None):
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
    name_adapters(a, adapters)
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
    name_adapters(b, adapters)
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


def check_overlap(make_engine, rtol: float, atol: float, adapters: dict[int, str] | None = None) -> None:
    """`make_engine(overlap, eos)`: a warmed-up engine. The script's reports with overlap must be
    the plain ones: same calls, same requests, same tokens and finish reasons, logprobs within
    tolerance; a request the router filtered never gets another token. `adapters`: request id ->
    LoRA adapter name."""
    plain, _ = overlap_script(make_engine(False), None, adapters)
    eos = dict(plain)["decode 2"][0][0]  # an EOS for request 0: the token of its fourth step
    plain, plain_lp = overlap_script(make_engine(False, eos), eos, adapters)
    over, over_lp = overlap_script(make_engine(True, eos), eos, adapters)
    assert [c[0] for c in over] == [c[0] for c in plain]
    for (name, p), (_, o) in zip(plain, over):
        assert o == p, name
    for r in plain_lp:
        numpy.testing.assert_allclose(over_lp[r], plain_lp[r], rtol=rtol, atol=atol)
    ended = {r: f for _, c in plain for r, (_, f) in c.items() if f}
    assert ended[0] == 2 and ended[2] == 1  # EOS and length both exercised
    names = [name for name, _ in over]
    # a filtered request never gets another token, though its next step had been launched
    assert all(1 not in c for _, c in over[names.index("decode 2") + 1:])
    assert all(11 not in c for _, c in over[names.index("decode ab 2") + 1:])
    assert any(11 in c for _, c in over[: names.index("decode ab 2") + 1])


def script_requests() -> list[pb.Request]:
    """The four requests of `chunked_script`: two short ones (batch 1), then two long prompts (one
    with a repetition penalty, one sampled with a seed); each asks for its top 2 alternatives."""
    a, nxt = batch(1, [[5, 6, 7, 8], [9, 10]], 14)
    c, nxt = request(20, [(3 * i) % 90 + 2 for i in range(23)], 6, nxt)
    d, _ = request(21, [(7 * i) % 90 + 2 for i in range(17)], 6, nxt)
    c.parameters.repetition_penalty = 1.2
    d.parameters.do_sample, d.parameters.seed, d.parameters.temperature = True, 3, 0.9
    reqs = [*a.requests, c, d]
    for r in reqs:
        r.top_n_tokens = 2
    return reqs


Outputs = dict[int, tuple[list[int], list[float], list[tuple[list[int], list[float]]]]]


def _record(out: Outputs, res) -> None:
    """Tokens, logprobs and top-2 alternatives of a step's rows, per request."""
    assert not res.failed, res.failed
    for i, (r, t, lp) in enumerate(zip(res.request_ids, res.token_ids, res.logprobs)):
        toks, lps, tops = out.setdefault(r, ([], [], []))
        toks.append(int(t))
        lps.append(float(lp))
        if res.top_ids is not None:
            tops.append((res.top_ids[i, :2].tolist(), res.top_logprobs[i, :2].tolist()))


def chunked_script(eng, chunk: int, adapters: dict[int, str] | None = None, sliced: bool = True) -> Outputs:
    """Two requests decode while two long prompts arrive and are computed `chunk` tokens per step
    in the same steps (the router's token budget), the second starting mid-way through the
    first's chunks; returns each request's tokens, logprobs and top-2 alternatives, in the order
    the calls reported them. `sliced`: a chunk that does not finish its prompt carries only its
    own tokens (`input_len` set), as the router sends it; else every chunk carries the whole
    prompt."""
    out: Outputs = {}
    short0, short1, long_c, long_d = script_requests()
    a = pb.Batch(id=1, requests=[short0, short1])
    name_adapters(a, adapters)
    res, cached = eng.prefill(a)
    _record(out, res)
    pending = [[long_c, 0]]
    waiting = [long_d]
    bid = 10
    while cached is not None or pending or waiting:
        budget, chunks = chunk, []
        for p in pending:
            r, done = p
            n = min(budget, len(r.input_ids) - done)
            if n <= 0:
                break
            c = pb.Request()
            c.CopyFrom(r)
            c.cached_tokens, c.compute_tokens = done, n
            if sliced and done + n < len(r.input_ids):
                c.input_len = len(r.input_ids)
                del c.input_ids[:], c.cache_locs[:]
                c.input_ids.extend(r.input_ids[done:done + n])
                c.cache_locs.extend(r.cache_locs[done:done + n])
            if adapters and c.id in adapters:
                c.adapter_id = adapters[c.id]
            chunks.append(c)
            p[1] += n
            budget -= n
        pending = [p for p in pending if p[1] < len(p[0].input_ids)]
        if waiting and any(p[0].id == 20 for p in pending) and pending[0][1] >= 8:
            pending.append([waiting.pop(), 0])  # the second prompt arrives mid-way through the first
        elif waiting and not pending:
            pending.append([waiting.pop(), 0])
        bid += 1
        prefill = pb.Batch(id=bid, requests=chunks) if chunks else None
        res, cached, _ = eng.step([cached.id] if cached is not None else [], None, prefill)
        _record(out, res)
    return out


def alone(eng, r: pb.Request, adapter: str | None = None) -> tuple[list[int], list[float], list]:
    """One request prefilled whole and decoded alone to its end: tokens, logprobs, top-2s."""
    if adapter:
        r.adapter_id = adapter
    b = pb.Batch(id=500 + r.id, requests=[r])  # a copy of r
    out: Outputs = {}
    res, cached = eng.prefill(b)
    while True:
        _record(out, res)
        if cached is None:
            return out[r.id]
        res, cached, _ = eng.decode([cached.id])
