"""What a shard's host spends on one chunk of a long prompt before the forward: parsing the
protobuf batch, checking the request, building the batch and the step's inputs; for the two forms
the contract allows: a chunk that carries only its own tokens (`input_len` set, as the router
sends it) and one that carries the whole prompt, which grows with the prompt and is paid n / c
times by a prompt of n tokens in chunks of c. CPU only; no model is loaded.

    python benchmark/chunk_host.py --tokens 32768,131072 --chunk 2048 [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.batch import Batch, check_request  # noqa: E402
from text_generation_server.pb import generate_pb2 as pb  # noqa: E402

BLOCK, VOCAB = 16, 49152


def chunk_batch(n: int, chunk: int, sliced: bool) -> bytes:
    """A serialized batch of one n-token prompt whose second-to-last chunk is due."""
    start = n - 2 * chunk
    span = range(start, start + chunk) if sliced else range(n)
    r = pb.Request(id=1, input_ids=[i % VOCAB for i in span], cache_locs=list(span), input_len=n if sliced else 0,
                   blocks=list(range(-(-n // BLOCK))), cached_tokens=start, compute_tokens=chunk)
    r.stopping_parameters.max_new_tokens = 16
    r.parameters.temperature = 1.0
    return pb.Batch(id=1, requests=[r]).SerializeToString()


def host_ms(data: bytes, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        b = pb.Batch()
        b.ParseFromString(data)
        req = b.requests[0]
        assert check_request(req, BLOCK, VOCAB, len(req.blocks)) is None
        Batch.from_pb(b.id, list(b.requests), BLOCK, VOCAB, torch.device("cpu")).prefill_inputs()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for n in (int(t) for t in a.tokens.split(",")):
        sliced, whole = (host_ms(chunk_batch(n, a.chunk, f), a.reps) for f in (True, False))
        k = -(-n // a.chunk)
        # per prompt: the router's form sends every chunk but the last sliced; the other, all whole
        rows.append(dict(prompt_tokens=n, chunk=a.chunk, chunks=k, sliced_ms_per_chunk=round(sliced, 3),
                         whole_ms_per_chunk=round(whole, 3), router_ms_per_prompt=round((k - 1) * sliced + whole, 1),
                         all_whole_ms_per_prompt=round(k * whole, 1)))
        print(json.dumps(rows[-1]))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
