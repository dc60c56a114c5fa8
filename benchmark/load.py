"""HTTP load generator: W2 (ShareGPT-like lengths), W3 (W2 over N LoRA adapters), TTFT for a long
prompt, W4 inter-token latency, SO (structured output: the ITL of unconstrained streams beside
constrained ones, mask and compile times from the server's metrics).

Prompts are random words `t<i>` of the benchmark models' word-level tokenizer (make_model.py), so a
request of n words is exactly n prompt tokens; every request generates exactly max_new_tokens
(the benchmark models have no end-of-sequence token). Results use the field names of vLLM's
serving benchmark and are written as JSON, with a throughput-vs-latency plot as PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np


def sharegpt_like(n: int, seed: int = 0, scale: float = 1.0, vocab: int = 128256) -> list[tuple[str, int, int]]:
    """(prompt, input_len, output_len): lognormal lengths (sigma 1, medians 157 / 126), kept when
    4 <= input <= 1024, output >= 4, input + output <= 2048; `scale` shrinks lengths (W6: 1/4)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        i = int(rng.lognormal(np.log(157), 1.0) * scale)
        o = int(rng.lognormal(np.log(126), 1.0) * scale)
        if 4 <= i <= 1024 * scale and o >= 4 and i + o <= 2048 * scale:
            words = " ".join(f"t{w}" for w in rng.integers(0, vocab, i))
            out.append((words, i, o))
    return out


@dataclass
class Result:
    ok: bool = False
    input_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def power_law_adapters(n_requests: int, n_adapters: int, alpha: float = 1.0, seed: int = 0) -> list[str]:
    """W3: each request's adapter `a<i>`, i drawn with probability proportional to 1 / (i + 1)^alpha."""
    p = 1.0 / np.arange(1, n_adapters + 1) ** alpha
    rng = np.random.default_rng(seed + 7)
    return [f"a{i}" for i in rng.choice(n_adapters, size=n_requests, p=p / p.sum())]


async def one(session: aiohttp.ClientSession, url: str, prompt: str, input_len: int, max_new: int,
              adapter: str | None = None, grammar: dict | None = None) -> Result:
    r = Result(input_len=input_len)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}
    if adapter:
        body["parameters"]["adapter_id"] = adapter
    if grammar:
        body["parameters"]["grammar"] = grammar
    t0 = time.perf_counter()
    last = t0
    try:
        async with session.post(url + "/generate_stream", json=body) as resp:
            if resp.status != 200:
                r.error = f"{resp.status}: {await resp.text()}"
                return r
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter()
                if r.output_len == 0:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
                r.output_len += 1
                if b'"error"' in line[:20]:
                    r.error = line.decode()
                    return r
        r.latency = time.perf_counter() - t0
        r.ok = r.output_len == max_new
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        r.error = repr(e)
    return r


async def run_requests(url: str, reqs: list[tuple[str, int, int]], rate: float | None, seed: int = 0,
                       adapters: list[str] | None = None) -> tuple[list[Result], float]:
    rnd = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        t0 = time.perf_counter()
        for k, (prompt, i, o) in enumerate(reqs):
            tasks.append(asyncio.create_task(one(session, url, prompt, i, o, adapters[k] if adapters else None)))
            if rate:
                await asyncio.sleep(rnd.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: [x * 1e3 for x in xs]  # noqa: E731
    ttft = ms([r.ttft for r in ok])
    tpot = ms([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    itl = ms([x for r in ok for x in r.itl])
    e2el = ms([r.latency for r in ok])
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    d = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "errors": sorted({r.error[:200] for r in results if r.error})[:5],
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        xs = xs or [float("nan")]
        d[f"mean_{name}_ms"] = float(np.mean(xs))
        d[f"median_{name}_ms"] = float(np.median(xs))
        d[f"p99_{name}_ms"] = float(np.percentile(xs, 99))
    return d


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["median_tpot_ms"] for r in runs.values()]
    ys = [r["output_throughput"] for r in runs.values()]
    ax.plot(xs, ys, "o-")
    for name, x, y in zip(runs, xs, ys):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("median TPOT (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Tessera: throughput vs latency")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def ttft_long(url: str, tokens: int, vocab: int, repeat: int = 5) -> dict:
    rng = np.random.default_rng(1)
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(repeat):
            prompt = " ".join(f"t{w}" for w in rng.integers(0, vocab, tokens))
            r = await one(session, url, prompt, tokens, 1)
            times.append(r.ttft * 1e3)
    return {"prompt_tokens": tokens, "ttft_ms": times, "median_ttft_ms": float(np.median(times[1:] or times))}


async def itl_at_batch(url: str, batch: int, tokens: int, vocab: int) -> dict:
    """W4: streams of `tokens` tokens, `batch` at once: median inter-token latency end to end."""
    reqs = [(" ".join(f"t{w}" for w in np.random.default_rng(i).integers(0, vocab, 16)), 16, tokens) for i in range(batch)]
    results, duration = await run_requests(url, reqs, None)
    s = summarize(results, duration)
    return {"batch": batch, "median_itl_ms": s["median_itl_ms"], "p99_itl_ms": s["p99_itl_ms"], "completed": s["completed"]}


# SO's constrained requests: a JSON array of at least `n` short strings, so that they keep
# generating (and computing masks) for the whole run, as the unconstrained streams do.
SO_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}


async def metric_sums(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("tessera_grammar_") and ("_sum" in line or "_count" in line):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def so(url: str, batch: int, tokens: int, vocab: int, share: float) -> dict:
    """`batch` streams of `tokens` tokens at once, `share` of them under SO_SCHEMA; the ITL of the
    unconstrained ones, and the router's mask time per step and compile time."""
    n_bound = round(batch * share)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"t{w}" for w in rng.integers(0, vocab, 16)) for _ in range(batch)]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        before = await metric_sums(session, url)
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(session, url, p, 16, tokens, grammar={"type": "json", "value": SO_SCHEMA}
                                         if i < n_bound else None)) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        after = await metric_sums(session, url)
    free = summarize(results[n_bound:], duration)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    mask_n = delta.get("tessera_grammar_mask_seconds_count", 0)
    compile_n = delta.get("tessera_grammar_compile_seconds_count", 0)
    return {"batch": batch, "constrained": n_bound, "unconstrained_median_itl_ms": free["median_itl_ms"],
            "unconstrained_p99_itl_ms": free["p99_itl_ms"], "completed": free["completed"],
            "constrained_completed": sum(r.ok for r in results[:n_bound]),
            "mask_ms_per_step": 1e3 * delta.get("tessera_grammar_mask_seconds_sum", 0) / mask_n if mask_n else None,
            "compile_ms": 1e3 * delta.get("tessera_grammar_compile_seconds_sum", 0) / compile_n if compile_n else None}


async def w3(url: str, n: int, scale: float, vocab: int, counts: list[int], alpha: float) -> dict:
    """W3: the same W2 requests (all at once) base-only and over N adapters with power-law
    popularity. Every adapter is made resident first (one short request each), so the runs measure
    serving, not the first load from disk; that load time is reported apart."""
    reqs = sharegpt_like(n, 0, scale, vocab)
    out: dict = {}
    t0 = time.perf_counter()
    warm = [("t1 t2 t3 t4", 4, 2)] * max(counts)
    results, _ = await run_requests(url, warm, None, adapters=[f"a{i}" for i in range(max(counts))])
    out["warm_load_s"] = time.perf_counter() - t0
    out["warm_failed"] = sum(not r.ok for r in results)
    for label, adapters in [("base", None)] + [(f"n={c}", power_law_adapters(n, c, alpha)) for c in counts]:
        results, duration = await run_requests(url, reqs, None, adapters=adapters)
        out[label] = summarize(results, duration)
        if adapters:
            out[label]["distinct_adapters"] = len(set(adapters))
            out[label]["ratio_to_base"] = out[label]["output_throughput"] / out["base"]["output_throughput"]
        print(json.dumps({label: {k: out[label][k] for k in ("request_throughput", "output_throughput", "completed", "failed")}}), flush=True)
    return out


async def w7(url: str, n_shared: int, n_chats: int, system_words: int, vocab: int, concurrency: int,
             max_new: int = 16, adapter: str | None = None) -> dict:
    """W7 (prefix reuse): `n_shared` requests that share one system prompt of `system_words`
    words, each with its own question, then `n_chats` two-turn conversations whose second turn
    repeats the first (prompt + answer) and adds a question. `concurrency` requests in flight
    (closed loop); TTFT of the shared requests and of the second turns."""
    rng = np.random.default_rng(3)

    def words(k: int) -> str:
        return " ".join(f"t{w}" for w in rng.integers(0, vocab, k))

    system = words(system_words)
    shared = [(f"{system} {words(16)}", system_words + 16, max_new) for _ in range(n_shared)]
    firsts = [words(system_words // 2) for _ in range(n_chats)]
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def shared_one(p):
            async with gate:
                return await one(session, url, *p, adapter)

        async def chat(first: str):
            async with gate:
                body = {"inputs": first, "parameters": {"max_new_tokens": max_new, **({"adapter_id": adapter} if adapter else {})}}
                async with session.post(url + "/generate", json=body) as resp:
                    answer = (await resp.json())["generated_text"]
                second = f"{first}{answer} {words(12)}"
                return await one(session, url, second, 0, max_new, adapter)

        t0 = time.perf_counter()
        shared_res = await asyncio.gather(*(shared_one(p) for p in shared))
        t1 = time.perf_counter()
        chat_res = await asyncio.gather(*(chat(f) for f in firsts))
        t2 = time.perf_counter()
    out = {"shared": summarize(list(shared_res), t1 - t0), "second_turns": summarize(list(chat_res), t2 - t1)}
    out["median_ttft_ms"] = float(np.median([r.ttft * 1e3 for r in [*shared_res, *chat_res] if r.ok] or [float("nan")]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("url")
    ap.add_argument("--workload", choices=["w2", "w3", "ttft", "w4", "w7", "so"], default="w2")
    ap.add_argument("--adapter-counts", default="1,8,32,100",
                    help="W3: numbers of adapters (named a0..a<N-1> on the server), each run against base-only")
    ap.add_argument("--adapter-alpha", type=float, default=1.0, help="W3: power-law exponent of adapter popularity")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--rates", default="inf", help="comma list of requests/s (inf: all at once)")
    ap.add_argument("--rate-requests", type=int, default=200, help="requests sent at each finite rate")
    ap.add_argument("--scale", type=float, default=1.0, help="length scale (W6 uses 0.25)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ttft-tokens", type=int, default=1024, help="prompt length of the TTFT workload")
    ap.add_argument("--w4-tokens", type=int, default=64, help="tokens per stream in W4 and SO")
    ap.add_argument("--so-batch", type=int, default=64, help="SO: streams at once")
    ap.add_argument("--so-shares", default="0,0.25,0,0.25,1", help="SO: shares of constrained streams, one run each")
    ap.add_argument("--w7-chats", type=int, default=50, help="W7: two-turn conversations after the shared requests")
    ap.add_argument("--w7-system-words", type=int, default=1000, help="W7: words of the shared system prompt")
    ap.add_argument("--concurrency", type=int, default=8, help="W7: requests in flight")
    ap.add_argument("--adapter", default=None, help="W7: every request on this adapter")
    ap.add_argument("--out", type=Path, required=True, help="JSON results; a PNG plot goes beside it")
    a = ap.parse_args()
    if a.workload == "ttft":
        res = asyncio.run(ttft_long(a.url, a.ttft_tokens, a.vocab))
    elif a.workload == "so":
        # Pairs in one server run: none constrained, a quarter, then all (mask time at full batch).
        res = {"so": [asyncio.run(so(a.url, a.so_batch, a.w4_tokens, a.vocab, float(share))) for share in a.so_shares.split(",")]}
    elif a.workload == "w4":
        res = {"w4": [asyncio.run(itl_at_batch(a.url, b, a.w4_tokens, a.vocab)) for b in (1, 64)]}
    elif a.workload == "w7":
        res = asyncio.run(w7(a.url, a.num_requests, a.w7_chats, a.w7_system_words, a.vocab, a.concurrency,
                             adapter=a.adapter))
    elif a.workload == "w3":
        res = asyncio.run(w3(a.url, a.num_requests, a.scale, a.vocab, [int(x) for x in a.adapter_counts.split(",")],
                             a.adapter_alpha))
        plot({k: v for k, v in res.items() if isinstance(v, dict) and "output_throughput" in v}, a.out.with_suffix(".png"))
    else:
        reqs = sharegpt_like(a.num_requests, 0, a.scale, a.vocab)
        res = {}
        for rate in a.rates.split(","):
            r = None if rate == "inf" else float(rate)
            results, duration = asyncio.run(run_requests(a.url, reqs if r is None else reqs[: a.rate_requests], r))
            res[f"rate={rate}"] = summarize(results, duration)
            print(json.dumps({rate: res[f"rate={rate}"]}), flush=True)
        plot(res, a.out.with_suffix(".png"))
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
