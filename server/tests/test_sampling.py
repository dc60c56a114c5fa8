"""Batched sampling: each row follows its own parameters; seeds reproduce."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from text_generation_server.sampling import noise
from text_generation_server.sampling.sampler import SamplingParams, filter_typical, sample

NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, frequency_penalty=0.0,
               presence_penalty=0.0, do_sample=False, watermark=False, seed=0)


def params(n, **kw):
    return [SimpleNamespace(**{**NEUTRAL, **kw}) for _ in range(n)]


def run(logits, rows, counts=None, out_counts=None, step=0, prev=None):
    sp = SamplingParams.from_rows(rows, torch.device("cpu"))
    steps = torch.full((len(rows),), step, dtype=torch.int64)
    return sample(logits, sp, steps, counts, out_counts, prev).ids


def test_greedy_is_argmax_with_logprob():
    logits = torch.randn(3, 50)
    sp = SamplingParams.from_rows(params(3), torch.device("cpu"))
    out = sample(logits, sp, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(out.ids, logits.argmax(-1))
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1).gather(1, out.ids[:, None])[:, 0])


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(4, 50)
    assert torch.equal(run(logits, params(4, do_sample=True, top_k=1, seed=3)), logits.argmax(-1))


def test_top_k_keeps_only_k_tokens():
    logits = torch.zeros(1, 50)
    logits[0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    seen = {run(logits, params(1, do_sample=True, top_k=2, temperature=5.0, seed=1), step=s).item() for s in range(300)}
    assert seen == {0, 1}


def test_tiny_top_p_is_greedy():
    logits = torch.randn(4, 50) * 5
    assert torch.equal(run(logits, params(4, do_sample=True, top_p=1e-6, seed=5)), logits.argmax(-1))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {run(logits, params(1, do_sample=True, top_p=0.7, seed=2), step=s).item() for s in range(400)}
    assert seen == {0, 1}


def test_typical_p_keeps_tokens_near_the_entropy():
    # A flat distribution over many tokens plus one likelier token: the likely one is atypical
    # (its surprisal is far below the entropy), so a typical set of half the mass leaves it out.
    logits = torch.cat([torch.tensor([[3.0]]), torch.zeros(1, 5000)], dim=1)
    filtered = filter_typical(logits, torch.tensor([0.5]))
    kept = torch.isfinite(filtered[0])
    assert not kept[0]
    assert logits.softmax(-1)[0][kept].sum() >= 0.5
    unchanged = filter_typical(logits, torch.tensor([1.0]))
    assert torch.equal(unchanged, logits)


def test_seed_reproduces_and_differs():
    logits = torch.zeros(1, 1000)  # uniform: the draw is all noise
    a = [run(logits, params(1, do_sample=True, seed=42), step=s).item() for s in range(8)]
    b = [run(logits, params(1, do_sample=True, seed=42), step=s).item() for s in range(8)]
    c = [run(logits, params(1, do_sample=True, seed=43), step=s).item() for s in range(8)]
    assert a == b
    assert a != c
    assert len(set(a)) > 1, "different steps draw differently"


def test_row_result_does_not_depend_on_batch_neighbours():
    logits = torch.randn(3, 100)
    rows = params(3, do_sample=True, temperature=0.8, seed=7)
    rows[1] = SimpleNamespace(**{**vars(rows[1]), "seed": 9})
    assert run(logits, rows)[2] == run(logits[2:3], rows[2:3])[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    for s in range(3000):
        counts[run(logits, params(1, do_sample=True, seed=11), step=s)] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_low_temperature_sharpens_high_flattens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    cold = sum(run(logits, params(1, do_sample=True, temperature=0.05, seed=1), step=s).item() == 0 for s in range(300))
    hot = sum(run(logits, params(1, do_sample=True, temperature=5.0, seed=1), step=s).item() == 0 for s in range(300))
    assert cold >= 295
    assert hot < 150


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    counts = torch.tensor([[1, 0, 0]], dtype=torch.int32)
    assert run(logits, params(1, repetition_penalty=1.2), counts).item() == 1  # 2.0 / 1.2 < 1.9
    assert run(logits, params(1), counts).item() == 0


def test_frequency_and_presence_penalties_use_output_counts():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    out_counts = torch.tensor([[2, 0, 0]], dtype=torch.int32)
    assert run(logits, params(1, frequency_penalty=0.3), out_counts=out_counts).item() == 1  # 2.0 - 0.6 < 1.5
    assert run(logits, params(1, frequency_penalty=0.2), out_counts=out_counts).item() == 0  # 2.0 - 0.4 > 1.5
    assert run(logits, params(1, frequency_penalty=0.3), out_counts=out_counts * 0).item() == 0
    assert run(logits, params(1, presence_penalty=0.6), out_counts=out_counts).item() == 1  # 2.0 - 0.6 < 1.5
    assert run(logits, params(1, frequency_penalty=-1.0), out_counts=torch.tensor([[0, 1, 0]], dtype=torch.int32)).item() == 1


def test_watermark_biases_a_green_list_seeded_by_the_previous_token():
    logits = torch.zeros(2, 1000)
    prev = torch.tensor([17, 17])
    rows = params(2, watermark=True)
    rows[1] = SimpleNamespace(**{**vars(rows[1]), "watermark": False})
    sp = SamplingParams.from_rows(rows, torch.device("cpu"))
    out = sample(logits, sp, torch.zeros(2, dtype=torch.int64), prev_tokens=prev)
    green = out.distribution[0] > out.distribution[0].min() + 1
    assert 400 < green.sum() < 600  # about gamma of the vocabulary
    assert torch.allclose(out.distribution[1], out.distribution[1][0])  # unwatermarked row untouched
    other = sample(logits, sp, torch.zeros(2, dtype=torch.int64), prev_tokens=torch.tensor([18, 18]))
    assert not torch.equal(green, other.distribution[0] > other.distribution[0].min() + 1)


def test_uniform_noise_in_range():
    u = noise.uniform(torch.tensor([0, 1, 2**62]), torch.tensor([0, 5, 9]), 10000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01


def test_noise_never_reaches_one_so_gumbel_noise_stays_finite():
    """Every 24-bit pattern's largest value used to round to 1.0 in float32: +inf noise made a
    random token win one draw in 2^24 per token (about one step in 340 at a 49k vocabulary), and a
    masked one (structured output) win as NaN."""
    from text_generation_server.sampling import noise

    seeds = torch.arange(4096, dtype=torch.int64)
    u = noise.uniform(seeds, torch.zeros_like(seeds), 4096)  # 16.7M draws
    assert float(u.max()) < 1.0 and float(u.min()) > 0.0
    assert torch.isfinite(noise.gumbel(seeds[:256], torch.zeros(256, dtype=torch.int64), 4096)).all()
    top = torch.full((1,), (1 << noise.BITS) - 1, dtype=torch.int64)
    assert float(noise.to_unit(top)) < 1.0  # the largest pattern itself
    assert float(-torch.log(-torch.log(noise.to_unit(top)))) < 20


def test_logprobs_and_top_n_match_the_full_log_softmax():
    """The step never materializes log-softmax; what it reports equals it (greedy and sampled rows,
    with top-k filtering: -inf scores stay out of the alternatives)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g) * 4
    rows = params(2) + params(2, do_sample=True, temperature=0.7, top_k=20, seed=5)
    sp = SamplingParams.from_rows(rows, torch.device("cpu"))
    out = sample(logits, sp, torch.zeros(4, dtype=torch.int64))
    full = out.distribution
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(out.logprobs, full.gather(1, out.ids[:, None])[:, 0])
    torch.testing.assert_close(full[:2], logits[:2].log_softmax(-1))  # greedy rows: the model's own distribution
    ids, lps = out.top(5)
    want = torch.topk(full, 5, dim=-1)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(lps, want.values)
    assert torch.isfinite(lps).all()
