"""GPU timing pieces shared by the benchmarks: CUDA-graph capture as the engine's decode graphs are
made, and the mean time of a call measured with CUDA events."""

from __future__ import annotations

import torch


def capture(fn) -> torch.cuda.CUDAGraph:
    """`fn` run once on a side stream (lazy initialisation, allocator warm-up), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def event_ms(fn, reps: int = 20, warmup: int = 1) -> float:
    """Mean milliseconds per call of `fn` over `reps` back-to-back calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
