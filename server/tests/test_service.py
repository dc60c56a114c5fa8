"""The gRPC service's plumbing, on a stand-in for the engine (the real engine and server run in
the integration tests)."""

import asyncio
import threading
import time

from text_generation_server.server import TextGenerationService


def test_steps_always_run_on_the_same_thread_beside_unlocked_calls():
    """Each thread that runs a GEMM gets its own cuBLAS handle; a step on a thread new to it after
    the KV cache filled the GPU failed (CUBLAS_STATUS_ALLOC_FAILED), so steps keep one thread
    while unlocked calls (adapter loads) take others."""
    steps, others = [], []

    def step():
        steps.append(threading.get_ident())
        time.sleep(0.002)

    def load():
        others.append(threading.get_ident())
        time.sleep(0.02)

    svc = TextGenerationService(engine=None, socket_paths=[])

    async def main():
        calls = []
        for _ in range(12):
            calls += [svc._run(None, load, locked=False), svc._run(None, step)]
        await asyncio.gather(*calls)

    asyncio.run(main())
    assert len(steps) == 12 and len(set(steps)) == 1
    assert threading.get_ident() not in steps and steps[0] not in others
