"""Token-budget steps (`--max-batch-tokens`): a prompt longer than what a step has left after its
decoding rows is computed in chunks over several steps, beside the running requests, and the
answers do not change (greedy tokens, prompt logprobs) from a server computing prompts whole."""

from __future__ import annotations

import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import BackgroundStream, Server

STORY = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps aloud, "
         "polishing the great lens, and writing the weather into a leather book that his grandfather began. ")


@pytest.fixture(scope="module")
def small_steps():
    s = Server("--max-batch-tokens", "16", "--max-batch-prefill-tokens", "12").wait_ready()
    yield s
    s.stop()


def generate(server, prompt: str, **params) -> dict:
    params = {"max_new_tokens": 16, "details": True, **params}
    r = requests.post(server.url("/generate"), json={"inputs": prompt, "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["details"]


def metric(server, name: str) -> float:
    text = requests.get(server.url("/metrics"), timeout=10).text
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


def test_long_prompts_are_chunked_and_answer_as_when_computed_whole(server, small_steps):
    prompts = [STORY * k + f"Question {k}: what did the keeper count?" for k in (1, 2, 3)]
    want = [[t["id"] for t in generate(server, p)["tokens"]] for p in prompts]
    start = threading.Barrier(len(prompts))

    def go(p):
        start.wait()
        return [t["id"] for t in generate(small_steps, p)["tokens"]]

    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(go, prompts))
    assert got == want
    assert metric(small_steps, "tessera_prefill_chunks_total") > 10
    assert metric(small_steps, "tessera_chunked_prefills_total") >= 3
    info = requests.get(small_steps.url("/info"), timeout=10).json()
    assert info["max_batch_tokens"] == 16 and info["max_batch_prefill_tokens"] == 12
    assert info["kv_blocks_used"] + info["kv_blocks_free"] == info["kv_blocks_total"]


def test_a_running_stream_goes_on_while_a_long_prompt_is_chunked(small_steps, chat):
    stream = BackgroundStream(small_steps, {"inputs": chat("Write a long story about a lighthouse."),
                                            "parameters": {"max_new_tokens": 150}})
    assert stream.first.wait(120)
    before_chunks, before_tokens = metric(small_steps, "tessera_prefill_chunks_total"), len(stream.events)
    generate(small_steps, f"Log {uuid.uuid4().hex}. " + STORY * 4, max_new_tokens=2)  # nothing of it cached
    during = len(stream.events) - before_tokens
    assert metric(small_steps, "tessera_prefill_chunks_total") - before_chunks >= 10
    stream.thread.join(300)
    assert stream.events and all("error" not in e for e in stream.events)
    assert stream.events[-1]["generated_text"] is not None
    assert during >= 10, "the stream kept getting tokens in the steps that computed the long prompt's chunks"


def test_prompt_logprobs_are_computed_whole_even_past_the_budget(server, small_steps):
    prompt = STORY + "Where was the book?"
    want = generate(server, prompt, decoder_input_details=True, max_new_tokens=4)
    got = generate(small_steps, prompt, decoder_input_details=True, max_new_tokens=4)
    assert len(got["prefill"]) == len(want["prefill"]) > 16
    assert [p["id"] for p in got["prefill"]] == [p["id"] for p in want["prefill"]]
    for g, w in zip(got["prefill"][1:], want["prefill"][1:]):
        assert math.isclose(g["logprob"], w["logprob"], rel_tol=1e-3, abs_tol=1e-3)
    assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]


def test_budgets_must_be_positive():
    s = Server("--max-batch-tokens", "0")
    rc = s.proc.wait(60)
    s.stop()
    assert rc != 0 and "must be positive" in s.tail()
