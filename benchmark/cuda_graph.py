"""Capturing a function in a CUDA graph for the benchmarks, as the engine's decode graphs are made:
run once on a side stream (lazy initialisation, allocator warm-up), then capture."""

from __future__ import annotations

import torch


def capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
