"""What a shard's host spends on one chunk of a long prompt before the forward: parsing the
protobuf batch, checking the request, building the batch and the step's inputs. The router sends
the whole prompt (ids and cache locations) with every chunk, so this grows with the prompt, and a
prompt of n tokens in chunks of c pays it n / c times. CPU only; no model is loaded.

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


def chunk_batch(n: int, chunk: int) -> bytes:
    """A serialized batch of one n-token prompt whose second-to-last chunk is due."""
    r = pb.Request(id=1, input_ids=[i % VOCAB for i in range(n)], cache_locs=list(range(n)),
                   blocks=list(range(-(-n // BLOCK))), cached_tokens=n - 2 * chunk, compute_tokens=chunk)
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
        ms = host_ms(chunk_batch(n, a.chunk), a.reps)
        rows.append(dict(prompt_tokens=n, chunk=a.chunk, host_ms_per_chunk=round(ms, 3),
                         chunks=-(-n // a.chunk), host_ms_per_prompt=round(ms * -(-n // a.chunk), 1)))
        print(json.dumps(rows[-1]))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
