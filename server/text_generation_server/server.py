"""gRPC servicer: translates protobuf <-> engine calls. Thin on purpose."""

from __future__ import annotations

import asyncio
import os
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

import torch

from text_generation_server import env, tracing
from text_generation_server.engine import Engine, StepResult
from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.pb import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _cached(batch) -> pb.CachedBatch | None:
    if batch is None:
        return None
    return pb.CachedBatch(id=batch.id, request_ids=batch.request_ids, size=len(batch), max_tokens=batch.max_tokens)


def _generations(r: StepResult) -> list[pb.Generation]:
    out = []
    for i, rid in enumerate(r.request_ids):
        g = pb.Generation(
            request_id=rid,
            tokens=pb.Tokens(ids=[int(r.token_ids[i])], logprobs=[float(r.logprobs[i])]),
            finish_reason=int(r.finish[i]),
            seed=int(r.seeds[i]),
        )
        n = int(r.top_n[i])
        if n and r.top_ids is not None:
            g.top_tokens.append(pb.Tokens(ids=r.top_ids[i, :n].tolist(), logprobs=r.top_logprobs[i, :n].tolist()))
        if i in r.prefill:
            ids, lps = r.prefill[i]
            g.prefill_tokens.CopyFrom(pb.Tokens(ids=ids, logprobs=lps))
        out.append(g)
    for rid, why, code in r.failed:
        out.append(pb.Generation(request_id=rid, error=pb.ShardError(code=int(code), message=why, request_ids=[rid])))
    return out


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: Engine, socket_paths: list[str]):
        self.engine = engine
        self.socket_paths = socket_paths
        # Steps run in a worker thread (torch releases the GIL) so Health stays responsive;
        # the lock keeps them one at a time. Always the same thread: each thread that runs a GEMM
        # gets its own cuBLAS handle and workspace, and a thread new to it once the KV cache has
        # filled the GPU fails to create one (CUBLAS_STATUS_ALLOC_FAILED).
        self.lock = asyncio.Lock()
        self.step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")

    async def _run(self, context, fn, *args, locked: bool = True):
        """Runs `fn` in a worker thread (holding the step lock unless `locked` is False); any
        failure becomes a typed abort."""
        try:
            if locked:
                async with self.lock:
                    return await asyncio.get_running_loop().run_in_executor(self.step_thread, fn, *args)
            return await asyncio.to_thread(fn, *args)
        except ShardError as e:
            err = ShardError_to_pb(e)
        except Exception as e:  # noqa: BLE001 - every failure must reach the router typed
            log.exception("shard call %s failed", getattr(fn, "__name__", fn))
            if self.engine.cfg.group.world > 1:
                # Failed here alone (out of memory, a collective that timed out): the ranks may no
                # longer meet at the same collectives. Answer, then exit, so that the launcher stops
                # every rank (exit 1) instead of the next step hanging or mixing two steps' data.
                log.critical("rank %d of %d: exiting: a step failed on this rank, the tensor-parallel group "
                             "cannot continue", self.engine.cfg.group.rank, self.engine.cfg.group.world)
                asyncio.get_running_loop().call_later(0.5, os._exit, 1)
            code = ErrorCode.OUT_OF_MEMORY if isinstance(e, (torch.OutOfMemoryError, MemoryError)) else ErrorCode.INTERNAL
            err = pb.ShardError(code=int(code), message=f"{type(e).__name__}: {e}")
        status = grpc.StatusCode.RESOURCE_EXHAUSTED if err.code == ErrorCode.OUT_OF_MEMORY else (
            grpc.StatusCode.INVALID_ARGUMENT if err.code in (ErrorCode.INVALID_REQUEST, ErrorCode.BAD_ADAPTER,
                                                             ErrorCode.ADAPTER_NOT_FOUND) else
            grpc.StatusCode.NOT_FOUND if err.code == ErrorCode.BATCH_NOT_FOUND else grpc.StatusCode.INTERNAL)
        await context.abort(status, err.message, trailing_metadata=(("tessera-error-bin", err.SerializeToString()),))

    async def Info(self, request, context):
        mc = self.engine.model.config
        return pb.InfoResponse(
            dtype=str(self.engine.cfg.dtype).removeprefix("torch."),
            device_type=self.engine.cfg.device.type,
            block_size=self.engine.cfg.block_size,
            window_size=mc.sliding_window,
            vocab_size=mc.vocab_size,
            eos_token_ids=list(mc.eos_token_ids),
            max_position_embeddings=mc.max_position_embeddings,
            attention_backend=self.engine.attention.name,
            max_active_adapters=self.engine.adapters.max_active,
            launch_token=env.launch_token(),
            rank=self.engine.cfg.group.rank,
            world_size=self.engine.cfg.group.world,
            num_parameters=self.engine.model.num_parameters,
        )

    async def Health(self, request, context):
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.socket_paths)

    async def ClearCache(self, request, context):
        self.engine.clear(request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        batch = await self._run(context, self.engine.filter, request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=_cached(batch) or pb.CachedBatch(id=request.batch_id))

    async def Warmup(self, request, context):
        n = await self._run(context, self.engine.warmup, request.batch, request.num_blocks, request.max_total_tokens)
        return pb.WarmupResponse(num_blocks=n)

    async def Step(self, request, context):
        t0 = time.perf_counter_ns()
        prefill = request.prefill if request.HasField("prefill") else None
        with tracing.span("shard.step", context, batches=len(request.batch_ids),
                          new_requests=len(prefill.requests) if prefill is not None else 0):
            grants = {g.request_id: list(g.blocks) for g in request.grants}
            masks = {m.request_id: m.allowed for m in request.masks}
            result, batch, concat_ns = await self._run(context, self.engine.step, list(request.batch_ids), grants, prefill,
                                                       masks)
        return pb.StepResponse(
            generations=_generations(result), batch=_cached(batch), concat_ns=concat_ns,
            forward_ns=result.forward_ns, sample_ns=result.sample_ns, total_ns=time.perf_counter_ns() - t0,
        )

    # Adapter management runs beside the steps (no step lock): the pool has its own lock, and a
    # load copies into a slot no running step reads.

    async def LoadAdapter(self, request, context):
        t0 = time.perf_counter()
        res = await self._run(context, self._load_adapter, request, locked=False)
        return pb.LoadAdapterResponse(adapter=res, load_ms=int((time.perf_counter() - t0) * 1e3))

    def _load_adapter(self, request) -> pb.AdapterInfo:
        pool = self.engine.adapters
        host = None
        if request.HasField("path"):
            host = pool.register(request.name, pool.source_path(request.path))
        elif not request.activate:
            host = pool.register(request.name, pool.path(request.name))
        if request.activate:
            pool.load(request.name, host, self.engine.pinned)
        return _adapter_info(*pool.info(request.name))

    async def UnloadAdapter(self, request, context):
        await self._run(context, self.engine.adapters.unload, request.name, request.forget, locked=False)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        usable, unusable = await self._run(context, self.engine.adapters.listing, locked=False)
        return pb.ListAdaptersResponse(adapters=[_adapter_info(*a) for a in usable] +
                                       [pb.AdapterInfo(name=n, problem=why) for n, why in unusable])


def _adapter_info(name: str, rank: int, resident: bool, nbytes: int) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=name, rank=rank, resident=resident, nbytes=nbytes)


def ShardError_to_pb(e: ShardError) -> pb.ShardError:  # noqa: N802 - reads as a conversion
    return pb.ShardError(code=int(e.code), message=e.message, request_ids=e.request_ids)


async def serve(engine: Engine, uds_path: str, socket_paths: list[str]) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(engine, socket_paths), server)
    server.add_insecure_port(f"unix://{uds_path}")
    await server.start()
    log.info("shard listening on unix://%s", uds_path)
    await server.wait_for_termination()
