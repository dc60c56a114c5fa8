"""One engine step in named parts: the adapters of its rows, the forward (a CUDA-graph replay or
eager), sampling with the step's one host sync, and token-level finish. `Engine._step` runs them
in order; the engine owns the state they read (model, cache, attention, graphs, adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from text_generation_server.batch import Batch, StepInputs
from text_generation_server.lora.step import LoraStep
from text_generation_server.models.forward_context import ForwardContext, forward_context
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.sampling.sampler import sample

if TYPE_CHECKING:
    from text_generation_server.engine import Engine

# tessera.v1.FinishReason, from the generated module.
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
    forward_ns: int
    sample_ns: int
    failed: list[tuple[int, str, int]] = ()  # (request id, why, ErrorCode) of requests refused before running


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
        lora = engine.slot_lora(row_slots, prefill)
    engine.attention.plan(inputs.attention)
    with forward_context(ForwardContext(engine.attention, lora=lora)):
        hidden = engine.model.forward(inputs.input_ids, inputs.positions, engine.cache.k, engine.cache.v)
    return engine.model.compute_logits(hidden[inputs.last_token_index]), hidden


def prompt_logprobs(engine: Engine, hidden, inputs: StepInputs, prompts, rows) -> dict[int, tuple[list[int], list[float]]]:
    """Logprob of each prompt token given the ones before it, for the rows that asked."""
    cu = inputs.attention.cu_seqlens_q.cpu().numpy()
    index = np.concatenate([np.arange(cu[r], cu[r + 1] - 1) for r in rows])
    targets = np.concatenate([np.asarray(prompts[r][1:], dtype=np.int64) for r in rows])
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
        out[int(r)] = (list(prompts[r]), [float("nan")] + vals[at:at + n].tolist())
        at += n
    return out


def sample_and_sync(engine: Engine, batch: Batch, inputs: StepInputs, logits: torch.Tensor, tokens_in: np.ndarray):
    """Samples every row on the device, advances the batch, and brings what the response needs to
    the host in the step's one sync: (ids, logprobs, top ids or None, top logprobs or None)."""
    steps = torch.from_numpy(batch.generated).to(logits.device)
    prev = inputs.input_ids[inputs.last_token_index]
    max_n = int(batch.top_n.max(initial=0))
    with torch.inference_mode():
        out = sample(logits, batch.sampling, steps, batch.counts, batch.out_counts, prev)
        batch.advance(out.ids, tokens_in)
        top = out.top(max_n) if max_n else None
    if engine.attention.plans_pages_on_host:
        batch.prepare_decode_host()  # the next step's page tables, while the GPU works on this one
    ids_h, lp_h = out.ids.cpu().numpy(), out.logprobs.float().cpu().numpy()
    top_ids = top[0].cpu().numpy() if top is not None else None
    top_lp = top[1].float().cpu().numpy() if top is not None else None
    return ids_h, lp_h, top_ids, top_lp


def finish_reasons(batch: Batch, ids_h: np.ndarray, eos: np.ndarray) -> np.ndarray:
    """[B] FINISH_*: length when max_new_tokens is reached, end of sequence unless ignored."""
    finish = np.zeros(len(batch), dtype=np.int64)
    finish[batch.generated >= batch.max_new_tokens] = FINISH_LENGTH
    finish[np.isin(ids_h, eos) & ~batch.ignore_eos] = FINISH_EOS
    return finish
