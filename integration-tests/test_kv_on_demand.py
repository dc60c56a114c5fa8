"""KV blocks allocated as sequences grow, with preemption instead of failure: a cache sized for
about four long requests serves sixteen at once. Nearly all get their first token before any
finishes, the youngest are paused (preempted: blocks freed, recomputed later from prompt + the
tokens they had) when the cache is full, and every answer is the one it gets alone."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import Server

TOPICS = ["a dragon", "the sea", "a lost robot", "winter", "a small town", "the moon", "a violin", "a forest",
          "trains", "a lighthouse", "bees", "a desert", "a clockmaker", "rain", "a library", "volcanoes"]


@pytest.fixture(scope="module")
def tight():
    # 768 tokens of KV = 48 blocks of 16: a request of ~35 prompt + 150 new tokens needs 12.
    s = Server("--max-batch-total-tokens", "768", "--max-total-tokens", "400", "--max-input-tokens", "200",
               "--max-batch-prefill-tokens", "400").wait_ready()
    yield s
    s.stop()


def stream(server, prompt: str, max_new: int) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}
    t0 = time.time()
    out = {"ids": [], "first": None, "done": None}
    with requests.post(server.url("/generate_stream"), json=body, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                ev = json.loads(line[5:])
                assert "error" not in ev, ev
                out["ids"].append(ev["token"]["id"])
                out["first"] = out["first"] or time.time() - t0
                if ev["generated_text"] is not None:
                    out["done"] = time.time() - t0
    return out


def test_sixteen_long_requests_share_a_cache_for_four(tight, chat):
    prompts = [chat(f"Write a long story about {t}.") for t in TOPICS]
    start = threading.Barrier(len(prompts))

    def go(p):
        start.wait()
        return stream(tight, p, 150)

    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(go, prompts))
    # Nearly all run at once: a request that reaches the router after the others have grown into
    # the whole cache waits for blocks (a late arrival, on a loaded 2-core machine), as it should.
    first_done = min(r["done"] for r in together)
    early = sum(r["first"] < first_done for r in together)
    assert early >= 12, f"only {early} of 16 requests got a first token before the first one finished"
    metrics = requests.get(tight.url("/metrics"), timeout=10).text
    preempted = sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("tessera_preemptions_total"))
    assert preempted > 0, "the cache was too small for all: some request was preempted"
    long = sum(len(r["ids"]) > 120 for r in together)
    assert long >= 5, f"only {long} requests ran long: the cache was never short"
    alone = [stream(tight, p, 150)["ids"] for p in prompts]
    assert [r["ids"] for r in together] == alone
    info = requests.get(tight.url("/info"), timeout=10).json()
    assert info["kv_blocks_free"] == info["kv_blocks_total"]
