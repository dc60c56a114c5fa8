"""One engine step in named parts: the adapters of its rows, the forward (a CUDA-graph replay or
eager), sampling and the copies of its results to the host (`sample_and_launch` -> `Launched`),
then `collect`: the step's one wait and token-level finish. `Engine._launch` runs the first
parts, the engine decides when to collect (after launching the next step, with overlap); it owns
the state they read (model, cache, attention, graphs, adapters)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from text_generation_server.batch import Batch, StepInputs
from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.lora.step import LoraStep
from text_generation_server.models.forward_context import ForwardContext, forward_context
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.sampling.sampler import sample

if TYPE_CHECKING:
    from text_generation_server.engine import Engine

# tessera.v2.FinishReason, from the generated module.
FINISH_NONE, FINISH_LENGTH, FINISH_EOS = pb.FINISH_REASON_UNSPECIFIED, pb.LENGTH, pb.EOS_TOKEN


@dataclass
class StepResult:
    """One step's outcome per row, on the host."""

    request_ids: list[int]
    token_ids: np.ndarray  # [B] int64
    logprobs: np.ndarray  # [B] float32
    finish: np.ndarray  # [B] int: FINISH_*
    seeds: np.ndarray  # [B] int64
    top_n: np.ndarray  # [B] int64: alternatives wanted per row
    top_ids: np.ndarray | None  # [B, max top_n] int64, best first
    top_logprobs: np.ndarray | None  # [B, max top_n] float32
    prefill: dict[int, tuple[list[int], list[float]]]  # row -> (prompt ids, logprobs; first is NaN)
    forward_ns: int  # host time to launch the step (inputs, forward, sampling)
    sample_ns: int  # host time spent waiting for its results
    failed: list[tuple[int, str, int]] = ()  # (request id, why, ErrorCode) of requests refused before running

    def finished_ids(self) -> list[int]:
        return [rid for rid, f in zip(self.request_ids, self.finish.tolist()) if f != FINISH_NONE]

    @classmethod
    def concat(cls, parts: list["StepResult"]) -> "StepResult":
        if len(parts) == 1:
            return parts[0]
        width = max((p.top_ids.shape[1] for p in parts if p.top_ids is not None), default=0)

        def top(p: StepResult, name: str, dtype) -> np.ndarray:
            t = getattr(p, name)
            out = np.zeros((len(p.request_ids), width), dtype=dtype)
            if t is not None:
                out[:, : t.shape[1]] = t
            return out

        offsets = np.cumsum([0] + [len(p.request_ids) for p in parts])
        return cls(
            [r for p in parts for r in p.request_ids],
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("token_ids", "logprobs", "finish", "seeds", "top_n")),
            np.concatenate([top(p, "top_ids", np.int64) for p in parts]) if width else None,
            np.concatenate([top(p, "top_logprobs", np.float32) for p in parts]) if width else None,
            {int(o) + r: v for p, o in zip(parts, offsets) for r, v in p.prefill.items()},
            sum(p.forward_ns for p in parts), sum(p.sample_ns for p in parts),
            [f for p in parts for f in p.failed],
        )


@dataclass
class Launched:
    """A step whose work is queued on the device; `collect` brings its results to the host.
    Host arrays are snapshots of the rows at launch (the batch moves on, rows may leave)."""

    request_ids: list[int]
    ids: torch.Tensor  # [B] int64, host (pinned on CUDA): filled when `event` completes
    logprobs: torch.Tensor  # [B] float32, host
    top: tuple[torch.Tensor, torch.Tensor] | None  # host ([B, n] ids, [B, n] logprobs), rows that asked
    event: torch.cuda.Event | None  # recorded after the copies to the host; None on CPU (already done)
    generated: np.ndarray  # [B] tokens generated after this step
    max_new_tokens: np.ndarray
    ignore_eos: np.ndarray
    seeds: np.ndarray
    top_n: np.ndarray
    prefill: dict[int, tuple[list[int], list[float]]]
    forward_ns: int


@dataclass
class Forwarded:
    """A decode step whose forward is queued on the device and whose sampling waits for the
    masks of its constrained rows (`Engine._launch_ahead`); `sample_and_launch` finishes it."""

    prev: torch.Tensor  # [B] int64, device: the token each row fed this step (watermark seed)
    logits: torch.Tensor  # [B, vocab] float32, device: a copy (a graph's output buffer is reused)
    tokens_in: np.ndarray
    t0: int

    def select(self, host: np.ndarray, idx: torch.Tensor) -> "Forwarded":
        """The rows a filter keeps (host positions / the same on the device)."""
        return Forwarded(self.prev[idx], self.logits[idx], self.tokens_in[host], self.t0)


def empty_result(failed: list[tuple[int, str, int]]) -> StepResult:
    z = np.zeros(0, dtype=np.int64)
    return StepResult([], z, z.astype(np.float32), z, z, z, None, None, {}, 0, 0, failed)


def adapters_of_rows(engine: Engine, batch: Batch, prefill: bool, tokens_in: np.ndarray,
                     names: set[str]) -> tuple[LoraStep | None, np.ndarray | None]:
    """The step's LoRA: the torch-path `LoraStep`, or each token's slot in the CUDA slot table
    (the kernels are chosen later: a graph replay brings its own); (None, None) for base-only steps."""
    if not names:
        return None, None
    resident = engine.adapters.get(names, engine.pinned)
    token_adapters = np.repeat(batch.adapters, tokens_in) if prefill else batch.adapters
    if engine.adapters.slots is not None:
        slot_of = {"": 0, **{n: r.slot for n, r in resident.items()}}
        uniq, inverse = np.unique(token_adapters.astype(str), return_inverse=True)
        return None, np.array([slot_of[u] for u in uniq.tolist()], dtype=np.int64)[inverse]
    return LoraStep(token_adapters, {n: r.adapter for n, r in resident.items()}, engine.cfg.device), None


def forward(engine: Engine, batch: Batch, prefill: bool, inputs: StepInputs, lora, row_slots) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of each row's last token [B, vocab] float32, and the hidden states [T, hidden] when
    the step ran eagerly (prompt logprobs need them; a graph replay keeps its own)."""
    if engine.graphs is not None and not prefill and lora is None:
        logits = engine.graphs.run(inputs, len(batch), row_slots)
        if logits is not None:
            return logits, None
    if row_slots is not None:
        lora = engine.lora_kernels.step(row_slots, prefill)
    engine.attention.plan(inputs.attention)
    with forward_context(ForwardContext(engine.attention, lora=lora)):
        hidden = engine.model.forward(inputs.input_ids, inputs.positions, engine.cache.k, engine.cache.v)
    return engine.model.compute_logits(hidden[inputs.last_token_index]), hidden


def prompt_logprobs(engine: Engine, hidden, inputs: StepInputs, prompts, rows) -> dict[int, tuple[list[int], list[float]]]:
    """Logprob of each prompt token given the ones before it, for the rows that asked."""
    cu = inputs.attention.cu_seqlens_q.cpu().numpy()
    index = np.concatenate([np.arange(cu[r], cu[r + 1] - 1) for r in rows])
    targets = np.concatenate([prompts[r][1:] for r in rows])
    out: dict[int, tuple[list[int], list[float]]] = {}
    if len(index):
        dev = hidden.device
        lp = torch.log_softmax(engine.model.compute_logits(hidden[torch.from_numpy(index).to(dev)]), dim=-1)
        vals = lp.gather(1, torch.from_numpy(targets).to(dev)[:, None])[:, 0].cpu().numpy()
    else:
        vals = np.zeros(0, dtype=np.float32)
    at = 0
    for r in rows:
        n = len(prompts[r]) - 1
        out[int(r)] = (prompts[r].tolist(), [float("nan")] + vals[at:at + n].tolist())
        at += n
    return out


def sample_and_launch(engine: Engine, batch: Batch, prev: torch.Tensor, logits: torch.Tensor,
                      tokens_in: np.ndarray, prefill_lp: dict, t0: int) -> Launched:
    """Samples every row on the device, advances the batch, and queues the copies of what the
    response needs to the host (pinned buffers, an event after them): no host sync here, so the
    next step can be launched before this one's results are read."""
    dev = logits.device
    if batch.constrained.any():
        with torch.inference_mode():
            logits = apply_masks(logits, batch, engine.masks)
    steps = torch.from_numpy(batch.generated).to(dev, non_blocking=True)
    max_n = int(batch.top_n.max(initial=0))
    with torch.inference_mode():
        out = sample(logits, batch.sampling, steps, batch.counts, batch.out_counts, prev)
        batch.advance(out.ids, tokens_in)
        top = out.top(max_n) if max_n else None
        ids, lps = out.ids, out.logprobs.float()
        event = None
        if dev.type == "cuda":
            ids, lps = _to_host(ids), _to_host(lps)
            top = (_to_host(top[0]), _to_host(top[1].float())) if top is not None else None
            event = torch.cuda.Event()
            event.record()
        elif top is not None:
            top = (top[0], top[1].float())
    if engine.attention.plans_pages_on_host:
        batch.prepare_decode_host()  # the next step's page tables, while the GPU works on this one
    return Launched(list(batch.request_ids), ids, lps, top, event, batch.generated.copy(), batch.max_new_tokens.copy(),
                    batch.ignore_eos.copy(), batch.seeds.copy(), batch.top_n.copy(), prefill_lp,
                    time.perf_counter_ns() - t0)


def apply_masks(logits: torch.Tensor, batch: Batch, masks: dict[int, bytes]) -> torch.Tensor:
    """Structured output: the constrained rows' disallowed tokens get -inf, so that sampling (and
    the reported logprobs) see only what the router's grammar allows next. Other rows untouched.
    The packed bits go to the device as they came and are unpacked there."""
    # Rows computing a prompt chunk that is not their last sample nothing that is kept: no mask.
    partial = batch.partial_ids()
    rows = np.array([r for r in np.flatnonzero(batch.constrained).tolist() if batch.request_ids[r] not in partial],
                    dtype=np.int64)
    if not len(rows):
        return logits
    ids = [batch.request_ids[r] for r in rows.tolist()]
    missing = [i for i in ids if i not in masks]
    if missing:
        raise ShardError(ErrorCode.INVALID_REQUEST, f"no token mask for constrained requests {missing}", missing)
    vocab = logits.shape[1]
    width = -(-vocab // 32) * 4  # bytes of a whole mask
    packed = np.zeros((len(rows), width), dtype=np.uint8)
    for j, rid in enumerate(ids):
        row = np.frombuffer(masks[rid], dtype=np.uint8)[:width]
        packed[j, : len(row)] = row
    empty = [rid for rid, row in zip(ids, packed) if not row.any()]
    if empty:
        raise ShardError(ErrorCode.INVALID_REQUEST, f"token masks allowing no token for requests {empty}", empty)
    dev = logits.device
    index = torch.from_numpy(rows).to(dev, non_blocking=True)
    bits = torch.from_numpy(packed).to(dev, non_blocking=True)
    shifts = torch.arange(8, device=dev, dtype=torch.uint8)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().reshape(len(rows), width * 8)[:, :vocab]
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def _to_host(t: torch.Tensor) -> torch.Tensor:
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    h.copy_(t, non_blocking=True)
    return h


def collect(launched: Launched, eos: np.ndarray, keep: set[int] | None = None) -> StepResult:
    """Waits for a launched step and returns its outcome for the rows in `keep` (all when None):
    rows that left the batch since the launch (filtered, or ended by the previous step) are
    dropped, their token never reported."""
    t0 = time.perf_counter_ns()
    if launched.event is not None:
        launched.event.synchronize()
    ids, lps = launched.ids.numpy(), launched.logprobs.numpy()
    top_ids = launched.top[0].numpy() if launched.top is not None else None
    top_lp = launched.top[1].numpy() if launched.top is not None else None
    finish = finish_reasons(launched.generated, launched.max_new_tokens, launched.ignore_eos, ids, eos)
    rows = np.arange(len(ids))
    prefill = launched.prefill
    if keep is not None and len(keep) < len(ids):
        rows = np.array([i for i, r in enumerate(launched.request_ids) if r in keep], dtype=np.int64)
        prefill = {j: prefill[int(i)] for j, i in enumerate(rows.tolist()) if int(i) in prefill}
    pick = (lambda a: a[rows]) if len(rows) < len(ids) else (lambda a: a)
    return StepResult([launched.request_ids[i] for i in rows.tolist()], pick(ids), pick(lps), pick(finish),
                      pick(launched.seeds), pick(launched.top_n), None if top_ids is None else pick(top_ids),
                      None if top_lp is None else pick(top_lp), prefill, launched.forward_ns,
                      time.perf_counter_ns() - t0)


def finish_reasons(generated: np.ndarray, max_new_tokens: np.ndarray, ignore_eos: np.ndarray, ids: np.ndarray,
                   eos: np.ndarray) -> np.ndarray:
    """[B] FINISH_*: length when max_new_tokens is reached, end of sequence unless ignored."""
    finish = np.zeros(len(ids), dtype=np.int64)
    finish[generated >= max_new_tokens] = FINISH_LENGTH
    finish[np.isin(ids, eos) & ~ignore_eos] = FINISH_EOS
    return finish
