"""Batched next-token selection on the device: every row has its own parameters, one pass for all.

Order: repetition penalty (prompt + output) -> frequency/presence penalties (output only, as
OpenAI defines them) -> watermark bias -> greedy argmax for greedy rows; temperature -> top-k ->
top-p -> typical-p -> Gumbel-max draw for sampling rows. Returned logprobs are those of the
distribution each token was drawn from. A stage no row uses is skipped.

The distribution is never materialized as log-probabilities over the vocabulary: the chosen
token's logprob is its score minus one logsumexp per row, the Gumbel-max draw needs only the
scores (log-softmax shifts a row by a constant), and top-n alternatives come from one `topk` over
the scores, for the steps where some row asks (`SampleOutput.top`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from text_generation_server.sampling import noise

# name -> (dtype, neutral value)
_FIELDS = {
    "temperature": (np.float32, 1.0),
    "top_k": (np.int64, 0),
    "top_p": (np.float32, 1.0),
    "typical_p": (np.float32, 1.0),
    "repetition_penalty": (np.float32, 1.0),
    "frequency_penalty": (np.float32, 0.0),
    "presence_penalty": (np.float32, 0.0),
    "do_sample": (np.bool_, False),
    "watermark": (np.bool_, False),
    "seed": (np.int64, 0),
}

WATERMARK_GAMMA = 0.5  # share of the vocabulary in each green list
WATERMARK_DELTA = 2.0  # logit bias of green tokens
WATERMARK_KEY = 15485863  # hash key mixed with the previous token


def _neutralize(name: str, v):
    """Map 'off' encodings (0 for unset proto floats) to the neutral value."""
    if name in ("temperature", "repetition_penalty") and not v > 0:
        return 1.0
    if name in ("top_p", "typical_p") and not 0 < v < 1:
        return 1.0
    if name == "seed":
        return int(v) & 0x7FFFFFFFFFFFFFFF
    return v


@dataclass
class SamplingParams:
    """Per-row parameters: host copies (numpy, for decisions) and device copies (for the math)."""

    host: dict[str, np.ndarray]  # name -> [B], host
    dev: dict[str, torch.Tensor]  # name -> [B], model device, rebuilt when rows change

    @classmethod
    def from_host(cls, host: dict[str, np.ndarray], device: torch.device) -> "SamplingParams":
        return cls(host, {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in host.items()})  # staged at once: no stream wait

    @classmethod
    def from_rows(cls, rows: Sequence, device: torch.device) -> "SamplingParams":
        """rows: NextTokenChooserParameters-like objects."""
        host = {
            name: np.array([_neutralize(name, getattr(r, name)) for r in rows], dtype=dt)
            for name, (dt, _) in _FIELDS.items()
        }
        return cls.from_host(host, device)

    def select(self, index: np.ndarray, device: torch.device) -> "SamplingParams":
        return SamplingParams.from_host({k: v[index] for k, v in self.host.items()}, device)

    @classmethod
    def concat(cls, parts: Sequence["SamplingParams"], device: torch.device) -> "SamplingParams":
        return cls.from_host({k: np.concatenate([p.host[k] for p in parts]) for k in _FIELDS}, device)

    # Which stages run this step.
    @property
    def any_sample(self) -> bool:
        return bool(self.host["do_sample"].any())

    def any_(self, name: str) -> bool:
        neutral = _FIELDS[name][1]
        values = self.host[name]
        if name in ("top_k", "top_p", "typical_p", "temperature"):
            values = np.where(self.host["do_sample"], values, neutral)
        return bool((values != neutral).any())

    @property
    def needs_prompt_counts(self) -> bool:
        return self.any_("repetition_penalty")

    @property
    def needs_output_counts(self) -> bool:
        return self.any_("frequency_penalty") or self.any_("presence_penalty")


@dataclass
class SampleOutput:
    ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, of the chosen tokens
    scores: torch.Tensor  # [B, V] float32: the distribution each token was drawn from, up to `lse` per row
    lse: torch.Tensor  # [B] float32: logsumexp of each row of `scores`

    def top(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n most likely tokens of each row's distribution: ids [B, n], logprobs [B, n]."""
        values, ids = torch.topk(self.scores, n, dim=-1)
        return ids, values - self.lse[:, None]

    @property
    def distribution(self) -> torch.Tensor:
        """[B, V] log-probabilities (materialized on request: tests, never the step)."""
        return self.scores - self.lse[:, None]


def apply_repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Tokens seen before (counts > 0) get logit / p if positive, logit * p if negative."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(counts > 0, penalized, logits)


def apply_frequency_presence(logits: torch.Tensor, out_counts: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor) -> torch.Tensor:
    c = out_counts.to(logits.dtype)
    return logits - freq[:, None] * c - pres[:, None] * (c > 0).to(logits.dtype)


def watermark_bias(logits: torch.Tensor, prev_tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Kirchenbauer et al.: a green list seeded by the previous token gets +delta."""
    seeds = prev_tokens * WATERMARK_KEY
    green = noise.uniform(seeds, torch.zeros_like(seeds), logits.shape[-1]) < WATERMARK_GAMMA
    return logits + (WATERMARK_DELTA * (green & rows[:, None])).to(logits.dtype)


def filter_top_k_top_p(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf (one sort for both)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    if sp.any_("top_k"):
        k = sp.dev["top_k"]
        k = torch.where(k > 0, k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if sp.any_("top_p"):
        top_p = sp.dev["top_p"]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        remove = (before > top_p[:, None]) & (top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def filter_typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Typical sampling (Meister et al.): keep the tokens whose surprisal is closest to the
    entropy, until `mass` is covered."""
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(torch.nan_to_num(logp * p)).sum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted, dim=-1)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last[:, None])
    remove_sorted[:, 0] = False
    remove_sorted &= (mass < 1.0)[:, None]
    remove = torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample(
    logits: torch.Tensor,
    sp: SamplingParams,
    steps: torch.Tensor,
    counts: torch.Tensor | None = None,
    out_counts: torch.Tensor | None = None,
    prev_tokens: torch.Tensor | None = None,
) -> SampleOutput:
    """logits: [B, V] float32; steps: [B] int64 tokens generated so far (noise counter);
    counts: [B, V] int32 prompt+output occurrences; out_counts: [B, V] int32 output occurrences;
    prev_tokens: [B] int64 the tokens fed this step (watermark seed)."""
    if counts is not None and sp.needs_prompt_counts:
        logits = apply_repetition_penalty(logits, counts, sp.dev["repetition_penalty"])
    if out_counts is not None and sp.needs_output_counts:
        logits = apply_frequency_presence(logits, out_counts, sp.dev["frequency_penalty"], sp.dev["presence_penalty"])
    if prev_tokens is not None and sp.any_("watermark"):
        logits = watermark_bias(logits, prev_tokens, sp.dev["watermark"])
    greedy = torch.argmax(logits, dim=-1)
    if not sp.any_sample:
        return _output(greedy, logits)

    scaled = logits / sp.dev["temperature"][:, None]
    if sp.any_("top_k") or sp.any_("top_p"):
        scaled = filter_top_k_top_p(scaled, sp)
    if sp.any_("typical_p"):
        scaled = filter_typical(scaled, torch.where(sp.dev["do_sample"], sp.dev["typical_p"], 1.0))
    sample_rows = sp.dev["do_sample"]
    scores = torch.where(sample_rows[:, None], scaled, logits)
    drawn = torch.argmax(scores + noise.gumbel(sp.dev["seed"], steps, logits.shape[-1]), dim=-1)
    return _output(torch.where(sample_rows, drawn, greedy), scores)


def _output(ids: torch.Tensor, scores: torch.Tensor) -> SampleOutput:
    lse = torch.logsumexp(scores, dim=-1)
    return SampleOutput(ids, scores.gather(1, ids[:, None])[:, 0] - lse, scores, lse)
