"""Overlapped steps end to end (the shard launches each batch's next decode step before answering
the current one; on by default on CUDA, forced on here on the CPU): through the real router, the
answers must be the ones a server without overlap gives, with requests leaving mid-batch by stop
sequence, by disconnect, by EOS and by length, and every KV block freed afterwards."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import Server
from test_generate import generate, wait_blocks_free


@pytest.fixture(scope="module")
def overlapped():
    s = Server(env={"TESSERA_OVERLAP": "1"}).wait_ready()
    yield s
    s.stop()


def cases(chat):
    out = []
    for i in range(8):
        params = {"max_new_tokens": 6 + 4 * i, "decoder_input_details": False}
        if i % 3 == 1:
            params.update(do_sample=True, temperature=0.9, top_k=40, seed=100 + i)
        if i == 2:
            params["stop"] = [" Paris"]
        if i == 5:
            params["repetition_penalty"] = 1.3
        out.append((chat("What is the capital of France?" if i == 2 else f"Count from {i} to {i + 9}."), params))
    return out


def run_all(server, cs):
    with ThreadPoolExecutor(len(cs)) as ex:
        outs = list(ex.map(lambda c: generate(server, c[0], **c[1]), cs))
    return [(o["generated_text"], o["details"]["finish_reason"], [t["id"] for t in o["details"]["tokens"]]) for o in outs]


def test_overlapped_answers_match_plain_ones(server, overlapped, chat):
    cs = cases(chat)
    plain = run_all(server, cs)
    assert {f for _, f, _ in plain} >= {"length", "stop_sequence"}
    assert run_all(overlapped, cs) == plain
    # alone, too
    assert [run_all(overlapped, [c])[0] for c in cs[:3]] == plain[:3]


def test_a_client_leaving_mid_stream_loses_nothing_else(overlapped, chat):
    body = {"inputs": chat("Count from 1 to 50."), "parameters": {"max_new_tokens": 60}}
    with ThreadPoolExecutor(2) as ex:
        other = ex.submit(generate, overlapped, chat("Count from 3 to 12."), max_new_tokens=20)
        with requests.post(overlapped.url("/generate_stream"), json=body, stream=True, timeout=120) as r:
            for n, line in enumerate(r.iter_lines()):
                if line.startswith(b"data:") and n > 6:
                    json.loads(line[5:])
                    break  # the client goes away; its next step was already launched
        got = other.result()
    again = generate(overlapped, chat("Count from 3 to 12."), max_new_tokens=20)
    assert got["generated_text"] == again["generated_text"]
    assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in again["details"]["tokens"]]
    info = wait_blocks_free(overlapped)
    assert info["kv_blocks_free"] == info["kv_blocks_total"]
