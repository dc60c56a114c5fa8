"""Each sampling parameter changes outputs the way its definition says, on the real model."""

from __future__ import annotations

import torch
import requests

from text_generation_server.sampling.noise import uniform
from text_generation_server.sampling.sampler import WATERMARK_GAMMA, WATERMARK_KEY


def gen(server, inputs, **params):
    params.setdefault("details", True)
    r = requests.post(server.url("/generate"), json={"inputs": inputs, "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def ids(r):
    return [t["id"] for t in r["details"]["tokens"]]


PROMPT = "Once upon a time, in a small village,"
REPEAT = "one two one two one two one two one two"


def test_greedy_limits_of_sampling(server):
    greedy = ids(gen(server, PROMPT, max_new_tokens=16))
    assert ids(gen(server, PROMPT, max_new_tokens=16, do_sample=True, top_k=1, seed=4)) == greedy
    assert ids(gen(server, PROMPT, max_new_tokens=16, do_sample=True, top_p=1e-6, seed=4)) == greedy
    assert ids(gen(server, PROMPT, max_new_tokens=16, do_sample=True, temperature=1e-4, seed=4)) == greedy


def test_seed_reproduces_and_varies(server):
    a = [ids(gen(server, PROMPT, max_new_tokens=12, do_sample=True, seed=s)) for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]


def test_temperature_spreads_the_distribution(server):
    cold = {tuple(ids(gen(server, PROMPT, max_new_tokens=8, temperature=0.1, seed=s))) for s in range(6)}
    hot = {tuple(ids(gen(server, PROMPT, max_new_tokens=8, temperature=1.5, seed=s))) for s in range(6)}
    assert len(hot) > len(cold)


def test_top_k_bounds_the_choice(server):
    # With top_k=2 every sampled token was among the 2 most likely: check with top_n_tokens.
    r = gen(server, PROMPT, max_new_tokens=12, do_sample=True, top_k=2, temperature=2.0, seed=9, top_n_tokens=2)
    for tok, alts in zip(r["details"]["tokens"], r["details"]["top_tokens"]):
        assert tok["id"] in [a["id"] for a in alts]


def test_typical_p_changes_sampling(server):
    base = ids(gen(server, PROMPT, max_new_tokens=16, do_sample=True, seed=5))
    typical = ids(gen(server, PROMPT, max_new_tokens=16, do_sample=True, seed=5, typical_p=0.2))
    assert base != typical


def repeats(tokens):
    return len(tokens) - len(set(tokens))


def test_repetition_penalty_reduces_repeats(server):
    plain = repeats(ids(gen(server, REPEAT, max_new_tokens=24)))
    penalized = repeats(ids(gen(server, REPEAT, max_new_tokens=24, repetition_penalty=1.8)))
    assert penalized < plain


def test_frequency_and_presence_penalties_reduce_repeats(server):
    plain = repeats(ids(gen(server, REPEAT, max_new_tokens=24)))
    assert repeats(ids(gen(server, REPEAT, max_new_tokens=24, frequency_penalty=2.0))) < plain
    assert repeats(ids(gen(server, REPEAT, max_new_tokens=24, presence_penalty=2.0))) < plain
    # Negative penalties encourage repeats.
    assert repeats(ids(gen(server, PROMPT, max_new_tokens=24, frequency_penalty=-2.0))) >= repeats(ids(gen(server, PROMPT, max_new_tokens=24)))


def green_count(prompt_last: int, tokens: list[int], vocab: int) -> int:
    prev = [prompt_last] + tokens[:-1]
    green = 0
    for p, t in zip(prev, tokens):
        u = uniform(torch.tensor([p * WATERMARK_KEY]), torch.tensor([0]), vocab)[0]
        green += bool(u[t] < WATERMARK_GAMMA)
    return green


def test_watermark_is_detectable(server, tokenizer):
    """Kirchenbauer et al.'s z-test on the green-list share: high for watermarked text only."""
    vocab = len(tokenizer)
    last = tokenizer(PROMPT).input_ids[-1]
    marked = plain = total_m = total_p = 0
    for seed in range(4):
        m = ids(gen(server, PROMPT, max_new_tokens=40, do_sample=True, seed=seed, watermark=True))
        p = ids(gen(server, PROMPT, max_new_tokens=40, do_sample=True, seed=seed))
        marked, total_m = marked + green_count(last, m, vocab), total_m + len(m)
        plain, total_p = plain + green_count(last, p, vocab), total_p + len(p)

    def z(green, total):
        return (green - WATERMARK_GAMMA * total) / (total * WATERMARK_GAMMA * (1 - WATERMARK_GAMMA)) ** 0.5

    assert z(marked, total_m) > 4, (marked, total_m)
    assert z(plain, total_p) < 2.5, (plain, total_p)


def test_truncate_keeps_the_prompt_tail(server):
    r = gen(server, "alpha beta gamma delta epsilon", max_new_tokens=2, truncate=2, decoder_input_details=True)
    assert len(r["details"]["prefill"]) == 2
