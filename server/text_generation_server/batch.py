"""A batch as the shard holds it between steps: per-row state on the device, bookkeeping on the host.

Rows are requests. Filter keeps some rows; concatenate stacks batches row-wise. Every per-step
input (positions, cache locations, layout) is derived from this state, so nothing is kept twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from text_generation_server.attention.paged_meta import paged_kv_metadata
from text_generation_server.attention.base import AttentionInputs
from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.sampling.sampler import SamplingParams

if TYPE_CHECKING:
    from text_generation_server.step import Launched


def _input_len(r) -> int:
    """A request's whole input (the prompt, and a resumed request's generated tokens): a chunk
    that does not finish its prompt carries only its own tokens and says how long the input is."""
    return r.input_len or len(r.input_ids)


def _total(r) -> int:
    """The most tokens a request's sequence reaches: its prompt (with any tokens generated before a
    preemption) and what it may still generate."""
    return _input_len(r) + r.stopping_parameters.max_new_tokens - r.generated_tokens


def _in_place(r, field: str) -> np.ndarray:
    """A request's input_ids or cache_locs as int64 over its whole input: numpy views of the
    protobuf's packed fields (a copy-free read). A chunk that does not finish its prompt carries
    only its own, placed at cached_tokens; the rest of the array is never read (a step reads a
    row's positions cache_len..prompt_end only, and such a row neither samples nor counts)."""
    got = np.asarray(getattr(r, field), dtype=np.int64)
    if not r.input_len:
        return got
    whole = np.zeros(r.input_len, dtype=np.int64)
    whole[r.cached_tokens:r.cached_tokens + len(got)] = got
    return whole


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the device: the copy from pageable memory is
    staged at once and runs in stream order, so steps can be launched while earlier ones run (a
    blocking copy would wait for the whole stream)."""
    return torch.from_numpy(a).to(device, non_blocking=True)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64, device
    # [T] int64, device: each token's rotary table index, its position (plus the table's long half
    # on LongRoPE rows that use the long factors: `Batch.rope_offset`)
    positions: torch.Tensor
    attention: AttentionInputs
    last_token_index: torch.Tensor  # [B] int64, device: row i's last token in the flattened step


# Per-row host arrays ([B], numpy): `filter` indexes them and `concatenate` stacks them, by name.
HOST_ROWS = ("num_blocks", "cache_lens", "generated", "max_new_tokens", "ignore_eos", "top_n", "adapters", "constrained",
             "rope_offset")
# Per-row device counts ([B, vocab] or None): indexed / stacked (zeros for batches without them).
COUNT_ROWS = ("counts", "out_counts")


@dataclass
class Batch:
    id: int
    request_ids: list[int]
    block_tables: torch.Tensor  # [B, max_blocks] int32, device; rows padded with 0
    block_tables_host: np.ndarray  # [B, max_blocks] int32, host copy (for planning on the CPU)
    num_blocks: np.ndarray  # [B] int64, host: blocks allocated per row
    cache_lens: np.ndarray  # [B] int64, host: tokens in the KV cache per row
    generated: np.ndarray  # [B] int64, host: tokens generated so far
    max_new_tokens: np.ndarray  # [B] int64, host
    ignore_eos: np.ndarray  # [B] bool, host
    top_n: np.ndarray  # [B] int64, host: alternatives to return per token
    adapters: np.ndarray  # [B] object (str), host: LoRA adapter per row, '' = base model
    constrained: np.ndarray  # [B] bool, host: structured output (a token mask comes with each step)
    rope_offset: np.ndarray  # [B] int64, host: added to positions to index the rotary table (LongRoPE's long half, else 0)
    last_tokens: torch.Tensor  # [B] int64, device: the token each row feeds next
    sampling: SamplingParams
    counts: torch.Tensor | None  # [B, vocab] int32, device: prompt + output occurrences; None unless a row has a repetition penalty
    out_counts: torch.Tensor | None  # [B, vocab] int32, device: output occurrences; None unless a row has a frequency/presence penalty
    block_size: int
    # Rows computing (a chunk of) their prompt in the next step; None when every row decodes.
    # Per row, None for a decoding row: its prompt ids and each prompt token's cache location
    # (a chunk that does not finish its prompt: zeros but for its own tokens, `_in_place`).
    prompt_ids: list[np.ndarray | None] | None = None  # [len(prompt)] int64 each, host
    prompt_cache_locs: list[np.ndarray | None] | None = None
    prompt_ends: np.ndarray | None = None  # [B] int64, host: KV positions after the next step (decoding rows: cache_lens + 1)
    prefill_logprobs: np.ndarray | None = None  # [B] bool, host: rows returning prompt logprobs
    # (cache_lens it was built for, page CSR of the next decode step): built ahead by prepare_decode_host
    next_host: tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    # Overlapped steps: the next decode step, already launched (the state above is past it), and
    # what went wrong launching it (raised by the decode that asks for it).
    ahead: "Launched | None" = None
    ahead_error: Exception | None = None
    # A constrained batch's next step with its forward launched ahead but its sampling deferred
    # until the call that brings the masks (`step.Forwarded`); rows follow the batch's order.
    pending: "Forwarded | None" = None

    @property
    def seeds(self) -> np.ndarray:
        return self.sampling.host["seed"]

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def max_tokens(self) -> int:
        return int(self.num_blocks.sum()) * self.block_size

    @classmethod
    def from_pb(cls, batch_id: int, reqs: Sequence, block_size: int, vocab_size: int, device: torch.device,
                long_rope: tuple[int, int] | None = None) -> "Batch":
        """reqs: pb.Request objects already checked with `check_request`. `long_rope`: a LongRoPE
        model's (original context, offset of the rotary table's long half): a request that may
        grow past the original context (prompt + max_new_tokens) is rotated with the long factors
        at every position, so that its keys and queries always agree."""
        if not reqs:
            raise ShardError(ErrorCode.INVALID_REQUEST, "empty batch")
        width = max(len(r.blocks) for r in reqs)
        tables = np.zeros((len(reqs), width), dtype=np.int32)
        for i, r in enumerate(reqs):
            tables[i, : len(r.blocks)] = r.blocks
        sp = SamplingParams.from_rows([r.parameters for r in reqs], device)
        prompts = [_in_place(r, "input_ids") for r in reqs]
        b = cls(
            id=batch_id,
            request_ids=[r.id for r in reqs],
            block_tables=to_device(tables, device),
            block_tables_host=tables,
            num_blocks=np.array([len(r.blocks) for r in reqs], dtype=np.int64),
            # a prompt's cached prefix (the router's prefix cache) is in the cache already
            cache_lens=np.array([r.cached_tokens for r in reqs], dtype=np.int64),
            # a preempted request's earlier tokens, recomputed as part of its prompt
            generated=np.array([r.generated_tokens for r in reqs], dtype=np.int64),
            max_new_tokens=np.array([r.stopping_parameters.max_new_tokens for r in reqs], dtype=np.int64),
            ignore_eos=np.array([r.stopping_parameters.ignore_eos_token for r in reqs], dtype=bool),
            top_n=np.array([r.top_n_tokens for r in reqs], dtype=np.int64),
            adapters=np.array([r.adapter_id if r.HasField("adapter_id") else "" for r in reqs], dtype=object),
            constrained=np.array([r.constrained for r in reqs], dtype=bool),
            rope_offset=np.array([long_rope[1] if long_rope and _total(r) > long_rope[0] else 0 for r in reqs],
                                 dtype=np.int64),
            last_tokens=torch.zeros(len(reqs), dtype=torch.int64, device=device),
            sampling=sp,
            counts=None,
            out_counts=None,
            block_size=block_size,
            prompt_ids=prompts,
            prompt_cache_locs=[_in_place(r, "cache_locs") for r in reqs],
            # a long prompt is computed in chunks: this step computes `compute_tokens` of it
            prompt_ends=np.array([r.cached_tokens + r.compute_tokens if r.compute_tokens else _input_len(r)
                                  for r in reqs], dtype=np.int64),
            prefill_logprobs=np.array([r.prefill_logprobs for r in reqs], dtype=bool),
        )
        if sp.needs_prompt_counts:
            b.counts = torch.zeros((len(reqs), vocab_size), dtype=torch.int32, device=device)
            counted = [p[:0] if r.input_len else p for p, r in zip(prompts, reqs)]  # a chunk's row never samples
            rows = np.repeat(np.arange(len(reqs)), [len(p) for p in counted])
            ids = np.concatenate(counted)
            b.counts.index_put_(
                (to_device(rows, device), to_device(ids, device)),
                torch.ones(len(ids), dtype=torch.int32, device=device), accumulate=True,
            )
        if sp.needs_output_counts:
            b.out_counts = torch.zeros((len(reqs), vocab_size), dtype=torch.int32, device=device)
            outs = [p[:0] if r.input_len else p[len(p) - r.generated_tokens:] for p, r in zip(prompts, reqs)]
            if any(len(o) for o in outs):
                rows = np.repeat(np.arange(len(reqs)), [len(o) for o in outs])
                ids = np.concatenate(outs)
                b.out_counts.index_put_((to_device(rows, device), to_device(ids, device)),
                                        torch.ones(len(ids), dtype=torch.int32, device=device), accumulate=True)
        return b

    def grow(self, grants: dict[int, list[int]]) -> None:
        """Appends granted blocks to rows' tables (KV allocated as sequences grow)."""
        pos = {rid: i for i, rid in enumerate(self.request_ids)}
        rows = [(pos[r], b) for r, b in grants.items() if r in pos and b]
        if not rows:
            return
        num = self.num_blocks.copy()
        for i, b in rows:
            num[i] += len(b)
        width = max(int(num.max()), self.block_tables_host.shape[1])
        tables = np.zeros((len(self), width), dtype=np.int32)
        tables[:, : self.block_tables_host.shape[1]] = self.block_tables_host
        for i, b in rows:
            tables[i, self.num_blocks[i]: num[i]] = b
        self.block_tables_host, self.num_blocks = tables, num
        self.block_tables = to_device(tables, self.block_tables.device)  # a new tensor: steps in flight keep theirs
        self.next_host = None

    # ---- per-step inputs -------------------------------------------------------------------

    def new_tokens(self) -> np.ndarray:
        """[B] tokens each row computes in its next step: a prompt chunk, or one."""
        if self.prompt_ends is None:
            return np.ones(len(self), dtype=np.int64)
        return self.prompt_ends - self.cache_lens

    def partial_ids(self) -> set[int]:
        """Rows whose next step computes a prompt chunk that is not the prompt's last: they write
        keys/values only, their sampled token is dropped, and they leave the batch after it."""
        if self.prompt_ids is None:
            return set()
        return {rid for rid, p, e in zip(self.request_ids, self.prompt_ids, self.prompt_ends.tolist())
                if p is not None and e < len(p)}

    def prefill_inputs(self) -> StepInputs:
        """A mixed step: prompt rows compute their chunk (prompt[cache_len:prompt_end]), the other
        rows the one token they feed next (on the device, from the previous step's sample)."""
        assert self.prompt_ids is not None, "prefill_inputs() without prompt rows"
        dev = self.block_tables.device
        bs = self.block_size
        starts, ends = self.cache_lens, self.prompt_ends  # keys/values after the step: `ends`
        self._check_room(ends)
        new = ends - starts
        cu = np.zeros(len(ends) + 1, dtype=np.int64)
        np.cumsum(new, out=cu[1:])
        positions = np.concatenate([np.arange(c, e) for c, e in zip(starts.tolist(), ends.tolist())])
        ids, locs, decoding = [], [], []
        for i, (p, c, e) in enumerate(zip(self.prompt_ids, starts.tolist(), ends.tolist())):
            if p is None:
                decoding.append(i)
                ids.append(np.zeros(1, dtype=np.int64))
                locs.append(np.array([int(self.block_tables_host[i, c // bs]) * bs + c % bs], dtype=np.int64))
            else:
                ids.append(p[c:e])
                locs.append(self.prompt_cache_locs[i][c:e])
        input_ids = to_device(np.concatenate(ids), dev)
        if decoding:
            rows = to_device(np.asarray(decoding, dtype=np.int64), dev)
            input_ids.index_copy_(0, to_device(cu[decoding], dev), self.last_tokens[rows])
        attn = AttentionInputs(
            cu_seqlens_q=to_device(cu.astype(np.int32), dev),
            kv_lens=to_device(ends.astype(np.int32), dev),
            block_tables=self.block_tables,
            cache_locs=to_device(np.concatenate(locs), dev),
            max_q=int(new.max()),
            max_kv=int(ends.max()),
            is_decode=False,
            cu_seqlens_q_host=cu.astype(np.int32),
            kv_lens_host=ends.astype(np.int32),
            block_tables_host=self.block_tables_host,
        )
        if self.rope_offset.any():
            positions = positions + np.repeat(self.rope_offset, new)
        return StepInputs(input_ids, to_device(positions, dev), attn, to_device(cu[1:] - 1, dev))

    def prepare_decode_host(self) -> None:
        """Builds the next decode step's host-side page metadata now (call it while the GPU runs
        the current step); `decode_inputs` uses it if the batch has not changed since."""
        kv = (self.cache_lens + 1).astype(np.int32)
        if (kv <= self.num_blocks * self.block_size).all():
            self.next_host = (self.cache_lens, paged_kv_metadata(kv, self.block_tables_host, self.block_size))

    def _check_room(self, ends: np.ndarray) -> None:
        """Refuses a step that would write keys/values past a row's blocks (`ends`: [B] KV
        positions after it)."""
        over = ends > self.num_blocks * self.block_size
        if over.any():
            ids = [self.request_ids[i] for i in np.flatnonzero(over)]
            raise ShardError(ErrorCode.INVALID_REQUEST, f"requests {ids} have no room left in their KV blocks for another token", ids)

    def decode_inputs(self) -> StepInputs:
        dev = self.block_tables.device
        bs = self.block_size
        self._check_room(self.cache_lens + 1)
        pos = self.cache_lens
        n = len(self)
        positions = to_device(pos, dev)
        rows = torch.arange(n, device=dev)
        locs = self.block_tables[rows, positions // bs].long() * bs + positions % bs
        attn = AttentionInputs(
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
            kv_lens=(positions + 1).to(torch.int32),
            block_tables=self.block_tables,
            cache_locs=locs,
            max_q=1,
            max_kv=int(pos.max()) + 1,
            is_decode=True,
            cu_seqlens_q_host=np.arange(n + 1, dtype=np.int32),
            kv_lens_host=(pos + 1).astype(np.int32),
            block_tables_host=self.block_tables_host,
            paged_host=self.next_host[1] if self.next_host and self.next_host[0] is self.cache_lens else None,
        )
        if self.rope_offset.any():
            positions = to_device(pos + self.rope_offset, dev)
        return StepInputs(self.last_tokens, positions, attn, rows)

    def advance(self, next_ids: torch.Tensor, tokens_in: np.ndarray) -> None:
        """Record this step's sampled tokens ([B] int64, device); tokens_in: [B] tokens written to the cache."""
        self.cache_lens = self.cache_lens + tokens_in
        self.generated = self.generated + 1
        self.last_tokens = next_ids
        self.prompt_ids = None
        self.prompt_cache_locs = None
        self.prompt_ends = None
        self.prefill_logprobs = None
        rows = torch.arange(len(self), device=next_ids.device)
        if self.counts is not None:
            self.counts[rows, next_ids] += 1
        if self.out_counts is not None:
            self.out_counts[rows, next_ids] += 1

    # ---- reshaping --------------------------------------------------------------------------

    def filter(self, keep_ids: Sequence[int]) -> "Batch":
        assert self.prompt_ids is None, "filter a batch between steps, not with prompts pending"
        pos = {rid: i for i, rid in enumerate(self.request_ids)}
        missing = [r for r in keep_ids if r not in pos]
        if missing:
            raise ShardError(ErrorCode.INVALID_REQUEST, f"batch {self.id} holds no requests {missing}", missing)
        host = np.array([pos[r] for r in keep_ids], dtype=np.int64)
        idx = to_device(host, self.block_tables.device)
        width = int(self.num_blocks[host].max()) if len(host) else 1
        return Batch(
            id=self.id,
            request_ids=list(keep_ids),
            block_tables=self.block_tables[idx, :width],
            block_tables_host=self.block_tables_host[host, :width],
            **{f: getattr(self, f)[host] for f in HOST_ROWS},
            last_tokens=self.last_tokens[idx],
            sampling=self.sampling.select(host, idx.device),
            **{f: getattr(self, f)[idx] if getattr(self, f) is not None else None for f in COUNT_ROWS},
            block_size=self.block_size,
            ahead=self.ahead,  # collected for the rows still here
            ahead_error=self.ahead_error,
            pending=self.pending.select(host, idx) if self.pending is not None else None,
        )

    @classmethod
    def concatenate(cls, batches: Sequence["Batch"]) -> "Batch":
        assert all(b.ahead is None and b.pending is None for b in batches), "collect launched steps before concatenating"
        if len(batches) == 1:
            return batches[0]
        dev = batches[0].block_tables.device
        width = max(b.block_tables.shape[1] for b in batches)
        tables = torch.cat([torch.nn.functional.pad(b.block_tables, (0, width - b.block_tables.shape[1])) for b in batches])
        tables_host = np.concatenate([np.pad(b.block_tables_host, ((0, 0), (0, width - b.block_tables_host.shape[1]))) for b in batches])
        sizes = [len(b) for b in batches]
        prompts = {}
        if any(b.prompt_ids is not None for b in batches):
            # a mixed step: decoding rows beside new prompts
            def rows(b: Batch, name: str) -> list:
                v = getattr(b, name)
                return list(v) if v is not None else [None] * len(b)
            prompts = dict(
                prompt_ids=[p for b in batches for p in rows(b, "prompt_ids")],
                prompt_cache_locs=[p for b in batches for p in rows(b, "prompt_cache_locs")],
                prompt_ends=np.concatenate([b.prompt_ends if b.prompt_ends is not None else b.cache_lens + 1 for b in batches]),
                prefill_logprobs=np.concatenate([b.prefill_logprobs if b.prefill_logprobs is not None else np.zeros(len(b), bool)
                                                 for b in batches]),
            )
        return cls(
            id=batches[0].id,
            request_ids=[r for b in batches for r in b.request_ids],
            block_tables=tables,
            block_tables_host=tables_host,
            **{f: np.concatenate([getattr(b, f) for b in batches]) for f in HOST_ROWS},
            last_tokens=torch.cat([b.last_tokens for b in batches]),
            sampling=SamplingParams.concat([b.sampling for b in batches], dev),
            **{f: _cat_optional([getattr(b, f) for b in batches], sizes, dev) for f in COUNT_ROWS},
            block_size=batches[0].block_size,
            **prompts,
        )


def _cat_optional(parts: list[torch.Tensor | None], sizes: list[int], device: torch.device) -> torch.Tensor | None:
    """Row-concatenate [n, V] tensors where some batches have none (their rows get zeros)."""
    if all(p is None for p in parts):
        return None
    vocab = next(p.shape[1] for p in parts if p is not None)
    return torch.cat([p if p is not None else torch.zeros((n, vocab), dtype=torch.int32, device=device)
                      for p, n in zip(parts, sizes)])


def check_request(r, block_size: int, vocab_size: int, num_blocks: int) -> str | None:
    """Why a new request cannot run, or None. Checked per request so one bad request fails alone."""
    if not r.input_ids:
        return "no input tokens"
    n = _input_len(r)
    if len(r.cache_locs) != len(r.input_ids):
        return f"{len(r.cache_locs)} cache locations for {len(r.input_ids)} tokens"
    if r.input_len and (r.compute_tokens != len(r.input_ids) or r.cached_tokens + r.compute_tokens >= n):
        return (f"a chunk that does not finish its input ({n} tokens) carries exactly the tokens it computes "
                f"(cached_tokens {r.cached_tokens}, compute_tokens {r.compute_tokens}, {len(r.input_ids)} sent)")
    if len(r.blocks) * block_size < n:
        return "block table too short for the prompt"
    if r.generated_tokens >= max(r.stopping_parameters.max_new_tokens, 1) or r.generated_tokens >= n:
        return "generated_tokens must be below max_new_tokens and within input_ids"
    if np.asarray(r.blocks).max() >= num_blocks:
        return f"block ids beyond the cache's {num_blocks} blocks"
    if np.asarray(r.cache_locs).max() >= num_blocks * block_size:
        return f"cache locations beyond the cache's {num_blocks * block_size} slots"
    if np.asarray(r.input_ids).max() >= vocab_size:
        return "token id out of vocabulary"
    if r.cached_tokens + r.compute_tokens > n or r.cached_tokens >= n:
        return (f"cached_tokens ({r.cached_tokens}) + compute_tokens ({r.compute_tokens}) must leave a prompt token "
                f"to compute and stay within the prompt ({n})")
    if r.prefill_logprobs and (r.cached_tokens or r.compute_tokens not in (0, n)):
        return "prompt logprobs need the whole prompt computed in one step (no cached tokens, no chunks)"
    return None
