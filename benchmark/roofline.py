"""The GPU's own ceilings, measured at the start of every run: copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

import json

import torch


def _time(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def measure() -> dict:
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_s = _time(lambda: b.copy_(a), 20)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = _time(lambda: m @ m, 10)
    del a, b, m
    torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_TBps": 2 * n / copy_s / 1e12,  # bytes read + written
        "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_s / 1e12,
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
