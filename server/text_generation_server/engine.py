"""The model runner: owns the model, the KV cache, the attention backend and the cached batches.

Every step is: build inputs from batch state -> the rows' adapters -> plan attention once ->
forward -> logits of each row's last token -> batched sampling -> one host sync -> token-level
stopping (the parts after the inputs are in `step.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from text_generation_server import env
from text_generation_server.attention import make_backend
from text_generation_server.batch import Batch, StepInputs, check_request
from text_generation_server.cache.kv_cache import KVCache
from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server import step
from text_generation_server.lora.pool import AdapterPool
from text_generation_server.models import load_model
from text_generation_server.parallel import SINGLE, Group
from text_generation_server.step import StepResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    """Model directory: config.json + *.safetensors."""
    dtype: torch.dtype
    """Parameter and activation dtype."""
    device: torch.device
    """Where tensors live."""
    block_size: int = 16
    """Tokens per KV block (must match the router)."""
    cuda_memory_fraction: float = 0.9
    """Share of free GPU memory the KV cache may use after warmup."""
    attention: str | None = None
    """Force an attention backend ("torch", "flashinfer"); default: by device."""
    cuda_graphs: tuple[int, ...] = ()
    """Decode batch sizes to capture as CUDA graphs (CUDA + FlashInfer only); empty: none."""
    lora_adapters: tuple[tuple[str, Path], ...] = ()
    """Adapters known at start (name, PEFT directory)."""
    adapter_source: Path | None = None
    """Directory whose subdirectories are adapters loadable by name on first use."""
    max_active_adapters: int = 8
    """Adapters kept resident at once (LRU)."""
    max_lora_rank: int = 64
    """Largest adapter rank on CUDA (the slot table is padded to it); the CPU path has no limit."""
    group: Group = SINGLE
    """This shard's tensor-parallel group (`parallel.py`); SINGLE at world size 1."""


class Engine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        t0 = time.perf_counter()
        self.model = load_model(cfg.model_dir, cfg.dtype, cfg.device, cfg.group)
        mc = self.model.config
        log.info("loaded %s (%d layers, %.1fM parameters) in %.1fs on %s/%s", mc.architecture, mc.num_layers,
                 self.model.num_parameters / 1e6, time.perf_counter() - t0, cfg.device, cfg.dtype)
        self.attention = make_backend(
            cfg.device, cfg.dtype, cfg.attention, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim, block_size=cfg.block_size, windows=mc.layer_windows,
            scale=mc.attn_scale, softcap=mc.attn_softcap,
        )
        self.graphs = None  # DecodeGraphs, captured at warmup
        self.adapters = AdapterPool(self.model.full_config, cfg.dtype, cfg.device, dict(cfg.lora_adapters),
                                    cfg.adapter_source, cfg.max_active_adapters, split=self.model.split)
        self.lora_kernels = None  # SlotKernels over the CUDA slot table (lora/kernels.py); None: the torch path
        if self.adapters.enabled and cfg.device.type == "cuda" and self.attention.name == "flashinfer":
            from text_generation_server.lora.kernels import make_slot_kernels
            from text_generation_server.lora.slots import SlotTable

            self.adapters.slots = SlotTable(mc, cfg.dtype, cfg.device, self.adapters.max_active, cfg.max_lora_rank)
            self.lora_kernels = make_slot_kernels(env.lora_kernel(), self.adapters.slots, env.segment_gemm_backend())
            log.info("LoRA slot table: %d slots of rank <= %d (%.1f MiB), %s kernels", self.adapters.max_active,
                     self.adapters.slots.max_rank, self.adapters.slots.nbytes() / 2**20, self.lora_kernels.name)
        self.eos = np.array(mc.eos_token_ids or [-1], dtype=np.int64)
        # LongRoPE: (original context, where the rotary table's long half starts), for Batch.from_pb
        self.long_rope = ((mc.rope.original_max_position_embeddings, mc.max_position_embeddings)
                          if mc.rope.kind == "longrope" else None)
        self.cache: KVCache | None = None
        self.batches: dict[int, Batch] = {}
        self._stepping: frozenset[str] = frozenset()  # adapters of the step being launched
        self.masks: dict[int, bytes] = {}  # the current step's token masks (structured output), by request id
        # Launch each batch's next decode step before returning the current one (TESSERA_OVERLAP).
        self.overlap = env.overlap(cfg.device.type)

    # ---- memory --------------------------------------------------------------------------

    def _alloc_cache(self, num_blocks: int) -> None:
        """`num_blocks` usable blocks plus one scratch block (the last) for CUDA-graph padding rows."""
        mc = self.model.config
        self.cache = None
        self.graphs = None
        self.cache = KVCache(mc.num_layers, num_blocks + 1, self.cfg.block_size, mc.num_kv_heads, mc.head_dim,
                             self.cfg.dtype, self.cfg.device)
        self.num_blocks = num_blocks

    def bytes_per_block(self) -> int:
        mc = self.model.config
        return KVCache.bytes_per_block(mc.num_layers, self.cfg.block_size, mc.num_kv_heads, mc.head_dim, self.cfg.dtype)

    def warmup(self, pb_batch, num_blocks: int, max_total_tokens: int = 0) -> int:
        """Run the largest planned prefill on a scratch cache, then size the real cache."""
        self.batches.clear()
        log.info("warmup: the largest step, %d prompt tokens in %d requests",
                 sum(len(r.input_ids) for r in pb_batch.requests), len(pb_batch.requests))
        scratch = max((max(r.blocks) for r in pb_batch.requests if r.blocks), default=0) + 1
        self._alloc_cache(scratch)
        try:
            reqs = list(pb_batch.requests)
            batch = Batch.from_pb(pb_batch.id, reqs, self.cfg.block_size, self.model.config.vocab_size, self.cfg.device,
                                  self.long_rope)
            step.collect(self._launch(batch), self.eos)
        except torch.OutOfMemoryError as e:
            raise ShardError(ErrorCode.OUT_OF_MEMORY, f"warmup prefill does not fit: {e}") from e
        self.cache = None
        if num_blocks <= 0:
            if self.cfg.device.type == "cuda":
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(self.cfg.device)
                num_blocks = int(free * self.cfg.cuda_memory_fraction) // self.bytes_per_block() - 1
            else:
                num_blocks = env.cpu_kv_cache_bytes() // self.bytes_per_block() - 1
        num_blocks = self.cfg.group.min(num_blocks, self.cfg.device)  # every rank holds the same cache
        if num_blocks < scratch:
            raise ShardError(ErrorCode.OUT_OF_MEMORY, f"only {num_blocks} KV blocks fit, the warmup batch needs {scratch}")
        self._alloc_cache(num_blocks)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.cfg.block_size,
                 num_blocks * self.bytes_per_block() / 2**20)
        if self.lora_kernels is not None:
            self.lora_kernels.compile(self.cfg.dtype)
        if self.cfg.cuda_graphs and self.cfg.device.type == "cuda" and self.attention.supports_cuda_graphs():
            from text_generation_server.cuda_graphs import DecodeGraphs

            max_pages = max(max_total_tokens, 1) // self.cfg.block_size + 2
            self.graphs = DecodeGraphs(self.model, self.attention, self.cache, self.cfg.cuda_graphs, max_pages, num_blocks,
                                       self.lora_kernels)
        return num_blocks

    # ---- steps -----------------------------------------------------------------------------

    def prefill(self, pb_batch) -> tuple[StepResult, Batch | None]:
        """A step of new requests only (tests and warm paths)."""
        result, batch, _ = self.step([], None, pb_batch)
        return result, batch

    def decode(self, batch_ids: list[int], grants: dict[int, list[int]] | None = None,
               masks: dict[int, bytes] | None = None) -> tuple[StepResult, Batch | None, int]:
        """A step of cached batches only."""
        return self.step(batch_ids, grants, None, masks)

    def _admit(self, pb_batch) -> tuple[Batch | None, list[tuple[int, str, int]]]:
        """The new requests of a step as a batch; the ones that cannot run fail alone."""
        vocab = self.model.config.vocab_size
        good, failed = [], []
        adapter_errors: dict[str, ShardError] = {}
        for name in {r.adapter_id for r in pb_batch.requests if r.HasField("adapter_id") and r.adapter_id}:
            try:
                self.adapters.get({name}, self.pinned)
            except ShardError as e:
                adapter_errors[name] = e
        for r in pb_batch.requests:
            why = check_request(r, self.cfg.block_size, vocab, self.num_blocks)
            if why is not None:
                failed.append((r.id, why, ErrorCode.INVALID_REQUEST))
            elif r.HasField("adapter_id") and r.adapter_id in adapter_errors:
                e = adapter_errors[r.adapter_id]
                failed.append((r.id, e.message, e.code))
            else:
                good.append(r)
        if not good:
            return None, failed
        return Batch.from_pb(pb_batch.id, good, self.cfg.block_size, vocab, self.cfg.device, self.long_rope), failed

    def step(self, batch_ids: list[int], grants: dict[int, list[int]] | None, pb_prefill,
             masks: dict[int, bytes] | None = None) -> tuple[StepResult, Batch | None, int]:
        """One step: a token for every row of the given cached batches (concatenated into the
        first) and the prompt chunks of new requests (`pb_prefill`), in one forward. `masks`: the
        allowed tokens of constrained rows (structured output), by request id.

        With overlap, a batch's next step is usually in flight already (launched by the previous
        call): this call launches the one after it, from its sampled ids on the device, with the
        new prompts' chunks in the same forward, and only then waits for the results it returns
        (so the new prompts' first tokens arrive with the next call). Rows computing a chunk that
        is not their prompt's last write keys/values only and leave the batch after the step."""
        self._require_cache()
        t0 = time.perf_counter_ns()
        self.masks = masks or {}
        missing = [b for b in batch_ids if b not in self.batches]
        if missing:
            raise ShardError(ErrorCode.BATCH_NOT_FOUND, f"batches {missing} not found")
        if pb_prefill is not None and not batch_ids and pb_prefill.id in self.batches:
            raise ShardError(ErrorCode.INVALID_REQUEST, f"batch {pb_prefill.id} already exists")
        if grants:
            unknown = set(grants) - {r for b in batch_ids for r in self.batches[b].request_ids}
            if unknown:
                raise ShardError(ErrorCode.INVALID_REQUEST, f"blocks granted to requests {sorted(unknown)} not in these batches",
                                 sorted(unknown))
        new, failed = self._admit(pb_prefill) if pb_prefill is not None and pb_prefill.requests else (None, [])
        parts = [self.batches.pop(b) for b in batch_ids]
        for p in parts:
            if p.ahead_error is not None:
                raise p.ahead_error
            if p.pending is not None:
                self._sample_pending(p)
            if grants:
                p.grow(grants)
        inflight = [p for p in parts if p.ahead is not None]
        fresh = [p for p in parts if p.ahead is None]
        launched = [(p.ahead, set(p.request_ids)) for p in inflight]
        for p in inflight:
            p.ahead = None
        # New prompts ride on the step launched ahead when one is; otherwise they run now. Not on a
        # batch with constrained rows: its steps' sampling waits for each call's masks.
        rides = new is not None and bool(inflight) and self.overlap and not any(p.constrained.any() for p in parts)
        now = fresh + ([new] if new is not None and not rides else [])
        if now:
            current = Batch.concatenate(now)
            partial = current.partial_ids()
            launched.append((self._launch(current), set(current.request_ids) - partial))
            current = self._without(current, partial)
            if current is not None:
                inflight.append(current)
        batch = Batch.concatenate(inflight) if inflight else None
        if batch is not None:
            batch.id = batch_ids[0] if batch_ids else pb_prefill.id
        concat_ns = time.perf_counter_ns() - t0
        batch = self._launch_ahead(batch, new if rides else None, batch_ids[0] if batch_ids else None)
        parts = [step.collect(lnch, self.eos, keep) for lnch, keep in launched]
        result = StepResult.concat(parts) if parts else step.empty_result([])
        result.failed = failed
        return result, self._keep(self._without(batch, result.finished_ids())), concat_ns

    def _launch_ahead(self, batch: Batch | None, new: Batch | None = None, batch_id: int | None = None) -> Batch | None:
        """With overlap: the rows that go on after the step just launched (rows reaching
        max_new_tokens are known to end), with the new prompts' chunks `new`, get their next step
        launched now. Rows that end by EOS, or that the router drops, are discarded from it at
        `collect`. A failure is kept and raised by the next step of the batch (its state may be
        half-advanced), unless the step carried prompt chunks (raised now: nothing else would)."""
        if not self.overlap:
            assert new is None, "prompts ride ahead only with overlap"
            return batch
        if batch is not None:
            ending = batch.generated >= batch.max_new_tokens
            batch = self._without(batch, [r for r, e in zip(batch.request_ids, ending.tolist()) if e])
        # A constrained row's next mask depends on the token this step returns: its batch's next
        # forward goes ahead, but the sampling waits for the next call's masks (`_sample_pending`),
        # and no prompt rides on it (`step` runs those now).
        sample = batch is None or not batch.constrained.any()
        assert sample or new is None, "prompts do not ride with constrained rows"
        if new is not None:
            batch = Batch.concatenate([b for b in (batch, new) if b is not None])
            batch.id = batch_id
        if batch is None:
            return None
        partial = batch.partial_ids()
        try:
            launched = self._launch(batch, sample=sample)
            if sample:
                batch.ahead = launched
            else:
                batch.pending = launched
        except Exception as e:  # noqa: BLE001 - reported by the call that asks for this step
            if new is not None:
                raise
            log.warning("launching the next step of batch %d failed: %s", batch.id, e)
            batch.ahead_error = e
        return self._without(batch, partial)

    @staticmethod
    def _without(batch: Batch | None, gone) -> Batch | None:
        """`batch` without the rows `gone` (as is when none of them is in it): rows the shard ended
        itself (length, EOS: the router need not filter them), rows known to end, or rows whose
        prompt chunk was not their last."""
        if batch is None or not gone:
            return batch
        gone = set(gone)
        keep = [r for r in batch.request_ids if r not in gone]
        if len(keep) == len(batch):
            return batch
        return batch.filter(keep) if keep else None

    def filter(self, batch_id: int, keep: list[int]) -> Batch | None:
        if batch_id not in self.batches:
            raise ShardError(ErrorCode.BATCH_NOT_FOUND, f"batch {batch_id} not found")
        batch = self.batches.pop(batch_id)
        if not keep:
            return None
        batch = batch.filter(keep)
        self.batches[batch_id] = batch
        return batch

    def clear(self, batch_id: int | None) -> None:
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def _keep(self, batch: Batch | None) -> Batch | None:
        if batch is None or len(batch) == 0:
            return None
        self.batches[batch.id] = batch
        return batch

    def pinned(self) -> frozenset[str]:
        """Adapters of the live batches and of the step running now: never evicted while they run.
        Called from adapter-loading threads too, hence the copies."""
        live = frozenset(a for b in list(self.batches.values()) for a in b.adapters.tolist() if a)
        return live | self._stepping

    def _require_cache(self) -> None:
        if self.cache is None:
            raise ShardError(ErrorCode.INVALID_REQUEST, "shard is not warmed up: call Warmup first")

    def _launch(self, batch: Batch, sample: bool = True) -> step.Launched | step.Forwarded:
        """Queues one step of `batch` on the device and advances the batch's state past it. With
        `sample` False (a decode step of a constrained batch launched ahead), only the forward:
        `_sample_pending` samples it when the masks come."""
        t0 = time.perf_counter_ns()
        prefill = batch.prompt_ids is not None  # prompt rows in the step: the eager, ragged path
        inputs: StepInputs = batch.prefill_inputs() if prefill else batch.decode_inputs()
        tokens_in = batch.new_tokens()
        names = set(batch.adapters.tolist()) - {""}
        self._stepping = frozenset(names)
        try:
            want_prefill = np.flatnonzero(batch.prefill_logprobs) if prefill else np.zeros(0, dtype=np.int64)
            lora, row_slots = step.adapters_of_rows(self, batch, prefill, tokens_in, names)
            logits, hidden = step.forward(self, batch, prefill, inputs, lora, row_slots)
            prev = inputs.input_ids[inputs.last_token_index]  # the token each row fed (watermark seed)
            if not sample:
                assert not prefill, "only decode steps wait for their masks"
                return step.Forwarded(prev, logits.clone(), tokens_in, t0)
            prefill_lp = step.prompt_logprobs(self, hidden, inputs, batch.prompt_ids, want_prefill) if len(want_prefill) else {}
            return step.sample_and_launch(self, batch, prev, logits, tokens_in, prefill_lp, t0)
        finally:
            self._stepping = frozenset()

    def _sample_pending(self, batch: Batch) -> None:
        """Samples a constrained batch's step whose forward went ahead, under this call's masks:
        the step becomes an ordinary launched one."""
        fwd, batch.pending = batch.pending, None
        batch.ahead = step.sample_and_launch(self, batch, fwd.prev, fwd.logits, fwd.tokens_in, {}, fwd.t0)
