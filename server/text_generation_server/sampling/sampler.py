"""Batched next-token selection on the device: every row has its own parameters, one pass for all.

Order (as in transformers): repetition penalty -> temperature -> top-k -> top-p -> sample.
Greedy rows take the argmax after penalties. Returned logprobs are those of the distribution
the token was drawn from (log-softmax of the processed logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from text_generation_server.sampling import noise


@dataclass
class SamplingParams:
    """Per-row sampling parameters of a batch. All [B] tensors live on the model's device."""

    temperature: torch.Tensor  # [B] float32, 1.0 = off
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1.0 = off
    repetition_penalty: torch.Tensor  # [B] float32, 1.0 = off
    do_sample: torch.Tensor  # [B] bool
    seeds: torch.Tensor  # [B] int64
    # Host-side summaries, so a step skips whole stages no row uses.
    any_sample: bool
    any_top_k: bool
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def from_rows(cls, rows: Sequence, device: torch.device) -> "SamplingParams":
        """rows: NextTokenChooserParameters-like objects."""
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        temp = [r.temperature if r.temperature > 0 else 1.0 for r in rows]
        top_k = [r.top_k for r in rows]
        top_p = [r.top_p if 0 < r.top_p < 1 else 1.0 for r in rows]
        rep = [r.repetition_penalty if r.repetition_penalty > 0 else 1.0 for r in rows]
        sample = [bool(r.do_sample) for r in rows]
        seeds = [int(r.seed) & 0x7FFFFFFFFFFFFFFF for r in rows]
        return cls(
            t(temp, torch.float32), t(top_k, torch.int64), t(top_p, torch.float32), t(rep, torch.float32),
            t(sample, torch.bool), t(seeds, torch.int64),
            any_sample=any(sample),
            any_top_k=any(k > 0 and s for k, s in zip(top_k, sample)),
            any_top_p=any(p < 1.0 and s for p, s in zip(top_p, sample)),
            any_penalty=any(p != 1.0 for p in rep),
        )

    def select(self, index: torch.Tensor, host_index: Sequence[int]) -> "SamplingParams":
        sample = self.do_sample[index]
        hs = sample.tolist()
        return SamplingParams(
            self.temperature[index], self.top_k[index], self.top_p[index], self.repetition_penalty[index],
            sample, self.seeds[index],
            any_sample=any(hs),
            any_top_k=bool(((self.top_k[index] > 0) & sample).any()),
            any_top_p=bool(((self.top_p[index] < 1.0) & sample).any()),
            any_penalty=bool((self.repetition_penalty[index] != 1.0).any()),
        )

    @classmethod
    def concat(cls, parts: Sequence["SamplingParams"]) -> "SamplingParams":
        return cls(
            *(torch.cat([getattr(p, f) for p in parts]) for f in
              ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "seeds")),
            any_sample=any(p.any_sample for p in parts),
            any_top_k=any(p.any_top_k for p in parts),
            any_top_p=any(p.any_top_p for p in parts),
            any_penalty=any(p.any_penalty for p in parts),
        )


def apply_repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Tokens seen before (counts > 0) get logit / p if positive, logit * p if negative."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(counts > 0, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    if sp.any_top_k:
        k = torch.where(sp.top_k > 0, sp.top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if sp.any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        remove = (before > sp.top_p[:, None]) & (sp.top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor, sp: SamplingParams, counts: torch.Tensor | None, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, V] float32; counts: [B, V] int32 token occurrences or None; steps: [B] int64.
    Returns (next token ids [B] int64, their logprobs [B] float32)."""
    if sp.any_penalty and counts is not None:
        logits = apply_repetition_penalty(logits, counts, sp.repetition_penalty)
    if not sp.any_sample:
        logprobs = torch.log_softmax(logits, dim=-1)
        ids = torch.argmax(logits, dim=-1)
        return ids, logprobs.gather(1, ids[:, None])[:, 0]

    scaled = logits / sp.temperature[:, None]
    if sp.any_top_k or sp.any_top_p:
        scaled = filter_top_k_top_p(scaled, sp)
    processed = torch.where(sp.do_sample[:, None], scaled, logits)
    logprobs = torch.log_softmax(processed, dim=-1)
    drawn = torch.argmax(logprobs + noise.gumbel(sp.seeds, steps, logits.shape[-1]), dim=-1)
    ids = torch.where(sp.do_sample, drawn, torch.argmax(logits, dim=-1))
    return ids, logprobs.gather(1, ids[:, None])[:, 0]
