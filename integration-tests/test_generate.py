"""The serving core end to end: answers, parity with transformers, continuous batching, KV accounting."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What is 2 + 2?",
]


def generate(server, inputs: str, **params) -> dict:
    params.setdefault("details", True)
    r = requests.post(server.url("/generate"), json={"inputs": inputs, "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def wait_blocks_free(server, timeout: float = 5.0) -> dict:
    end = time.time() + timeout
    while True:
        info = requests.get(server.url("/info"), timeout=5).json()
        if info["kv_blocks_free"] == info["kv_blocks_total"] or time.time() > end:
            return info
        time.sleep(0.05)


def test_answers_paris(server, chat):
    out = generate(server, chat("What is the capital of France?"), max_new_tokens=32)
    assert "Paris" in out["generated_text"]
    assert out["details"]["finish_reason"] in ("eos_token", "length")


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer, chat):
    """transformers' greedy generate on the same model directory: 32 new tokens per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for p in PROMPTS:
        ids = tokenizer(chat(p), return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=32, do_sample=False)
        out[p] = gen[0, ids.shape[1]:].tolist()
    return out


def token_ids(resp: dict) -> list[int]:
    return [t["id"] for t in resp["details"]["tokens"]]


def test_greedy_matches_transformers_alone(server, chat, reference):
    for p in PROMPTS:
        assert token_ids(generate(server, chat(p), max_new_tokens=32)) == reference[p], p


def test_greedy_matches_transformers_in_one_batch(server, chat, reference):
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        outs = list(ex.map(lambda p: generate(server, chat(p), max_new_tokens=32), PROMPTS))
    for p, o in zip(PROMPTS, outs):
        assert token_ids(o) == reference[p], p


def test_short_request_overtakes_long_one(server, chat):
    done: dict[str, float] = {}
    started = threading.Event()

    def long():
        body = {"inputs": chat("Tell me a very long story about a dragon."),
                "parameters": {"max_new_tokens": 200, "stop": [], "details": True}}
        with requests.post(server.url("/generate_stream"), json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    started.set()
        done["long"] = time.time()

    t = threading.Thread(target=long)
    t.start()
    assert started.wait(120), "long request never started"
    generate(server, chat("Say hi."), max_new_tokens=5)
    done["short"] = time.time()
    t.join(300)
    assert done["short"] < done["long"]


def test_sixteen_concurrent_requests_match_running_alone(server, chat):
    cases = [(chat(f"Count from {i} to {i + 5}."), 4 + 3 * i) for i in range(16)]
    alone = [generate(server, p, max_new_tokens=n)["generated_text"] for p, n in cases]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda c: generate(server, c[0], max_new_tokens=c[1])["generated_text"], cases))
    assert together == alone


def test_stream_events_follow_tgi_format(server, chat):
    body = {"inputs": chat("What is the capital of France?"), "parameters": {"max_new_tokens": 8, "details": True}}
    events = []
    with requests.post(server.url("/generate_stream"), json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["generated_tokens"] == len(events)
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])


def test_stop_sequence(server, chat):
    out = generate(server, chat("What is the capital of France?"), max_new_tokens=32, stop=[" Paris"])
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["generated_text"].endswith(" Paris")


def test_seeded_sampling_reproduces(server, chat):
    p = chat("Invent a name for a cat.")
    a = generate(server, p, max_new_tokens=12, do_sample=True, temperature=1.3, seed=7)
    b = generate(server, p, max_new_tokens=12, do_sample=True, temperature=1.3, seed=7)
    assert token_ids(a) == token_ids(b)
    assert a["details"]["seed"] == 7


def test_timing_headers(server, chat):
    r = requests.post(server.url("/generate"), json={"inputs": chat("Hi"), "parameters": {"max_new_tokens": 3}})
    for h in ("x-compute-time", "x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens",
              "x-generated-tokens"):
        assert h in r.headers, h


BAD = [
    ("malformed json", b'{"inputs": ', 400),
    ("missing inputs", {"parameters": {"max_new_tokens": 5}}, 422),
    ("empty inputs", {"inputs": "", "parameters": {"max_new_tokens": 5}}, 422),
    ("zero max_new_tokens", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422),
    ("negative max_new_tokens", {"inputs": "hi", "parameters": {"max_new_tokens": -4}}, 422),
    ("over max total", {"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 422),
    ("zero temperature", {"inputs": "hi", "parameters": {"temperature": 0}}, 422),
    ("negative temperature", {"inputs": "hi", "parameters": {"temperature": -1}}, 422),
    ("top_p above 1", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422),
    ("top_p zero", {"inputs": "hi", "parameters": {"top_p": 0}}, 422),
    ("negative top_k", {"inputs": "hi", "parameters": {"top_k": -1}}, 422),
    ("wrong type", {"inputs": 5}, 422),
]


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_json_4xx(server, route, name, body, status):
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = requests.post(server.url(route), timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] and err["error_type"]


def test_too_long_input_is_rejected(server):
    r = requests.post(server.url("/generate"), json={"inputs": "word " * 3000, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422
    assert "at most" in r.json()["error"]


def test_server_still_serves_after_bad_input(server, chat):
    requests.post(server.url("/generate"), data=b"\xff\xfe garbage", headers={"content-type": "application/json"})
    assert "Paris" in generate(server, chat("What is the capital of France?"), max_new_tokens=16)["generated_text"]


def test_unknown_route_is_json_404(server):
    r = requests.get(server.url("/nope"))
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_every_block_is_free_after_all_requests(server):
    # Runs last in this module (pytest keeps file order): everything above has finished or failed.
    info = wait_blocks_free(server)
    assert info["kv_blocks_total"] > 0
    assert info["kv_blocks_free"] == info["kv_blocks_total"]
    assert info["queue_size"] == 0
