"""The prefix cache end to end (`--prefix-caching`, on by default): prompts that begin like an
earlier one (a shared system prompt, a conversation's next turn) reuse its KV blocks and compute
only the rest; answers are token for token those of a server without the cache; adapters never
share blocks with the base model or with each other (`test_lora.py`)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import Server

SYSTEM = ("You are a careful assistant for a museum of natural history. Answer in one short sentence, "
          "mention the exhibit hall when it matters, never invent opening hours, and be kind to children. ")
QUESTIONS = ["Where are the dinosaurs?", "What do owls eat?", "How old is the oldest fossil here?",
             "Can I touch the meteorite?", "Why is the sky blue?", "Do you have a cafe?"]


@pytest.fixture(scope="module")
def uncached():
    s = Server("--prefix-caching", "off").wait_ready()
    yield s
    s.stop()


def ask(server, tokenizer, system: str, question: str, **params) -> dict:
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    params = {"max_new_tokens": 12, "details": True, **params}
    r = requests.post(server.url("/generate"), json={"inputs": prompt, "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return {"ids": [t["id"] for t in d["tokens"]], "cached": d["cached_tokens"], "prefill": d["prefill"]}


def test_a_shared_system_prompt_is_computed_once_and_answers_do_not_change(server, uncached, tokenizer):
    system = SYSTEM + f"Visitor code {uuid.uuid4().hex}."  # a prefix no earlier test cached
    first = ask(server, tokenizer, system, QUESTIONS[0])
    assert first["cached"] == 0
    n_system = len(tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=True))
    later = [ask(server, tokenizer, system, q) for q in QUESTIONS[1:3]]
    with ThreadPoolExecutor(3) as ex:
        later += list(ex.map(lambda q: ask(server, tokenizer, system, q), QUESTIONS[3:]))
    assert all(r["cached"] >= (n_system // 16 - 1) * 16 and r["cached"] % 16 == 0 for r in later), [r["cached"] for r in later]
    plain = [ask(uncached, tokenizer, system, q) for q in QUESTIONS]
    assert all(r["cached"] == 0 for r in plain)
    assert [r["ids"] for r in [first, *later]] == [r["ids"] for r in plain]
    # the same question again: all of its prompt but the last block comes from the cache
    again = ask(server, tokenizer, system, QUESTIONS[0])
    assert again["ids"] == first["ids"] and again["cached"] >= n_system


def test_prompt_logprobs_compute_every_token(server, tokenizer):
    system = SYSTEM + f"Visitor code {uuid.uuid4().hex}."
    ask(server, tokenizer, system, QUESTIONS[0])
    r = ask(server, tokenizer, system, QUESTIONS[1], decoder_input_details=True)
    assert r["cached"] == 0 and len(r["prefill"]) > 40 and all(p["logprob"] is not None for p in r["prefill"][1:])


def test_a_conversations_next_turn_reuses_the_first(server, tokenizer):
    system = SYSTEM + f"Visitor code {uuid.uuid4().hex}."
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me about the mammoth hall."}]
    prompt1 = tokenizer.apply_chat_template(turn1, tokenize=False, add_generation_prompt=True)
    r = requests.post(server.url("/generate"), json={"inputs": prompt1, "parameters": {"max_new_tokens": 40}}, timeout=300)
    answer = r.json()["generated_text"]
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the whales?"}]
    r2 = requests.post(server.url("/v1/chat/completions"), timeout=300,
                       json={"model": "tgi", "messages": turn2, "max_tokens": 8})
    assert r2.status_code == 200, r2.text
    cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    n1 = len(tokenizer(prompt1).input_ids)
    assert cached >= n1 // 16 * 16 > 0


def test_cache_state_is_reported(server, tokenizer):
    system = SYSTEM + f"Visitor code {uuid.uuid4().hex}."
    for q in QUESTIONS[:2]:
        ask(server, tokenizer, system, q)
    metrics = requests.get(server.url("/metrics"), timeout=10).text
    values = {l.split(" ")[0]: float(l.split(" ")[1]) for l in metrics.splitlines() if l.startswith("tessera_prefix_cache_")}
    assert values["tessera_prefix_cache_hit_tokens_total"] > 0 and values["tessera_prefix_cache_hits_total"] >= 1
    assert values["tessera_prefix_cache_queried_tokens_total"] > values["tessera_prefix_cache_hit_tokens_total"]
    info = requests.get(server.url("/info"), timeout=10).json()
    assert 0 < info["kv_blocks_cached"] <= info["kv_blocks_free"] <= info["kv_blocks_total"]
