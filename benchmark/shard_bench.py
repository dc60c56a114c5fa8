"""Shard-level benchmark: times prefill and decode Steps per batch size over gRPC against one shard
(or `--num-shard N` tensor-parallel ranks, each call sent to all as the router does),
skipping the router (W1 decode roofline, W4 shard-alone step time, prefill time for TTFT).

Every step is reported against the roofline: bytes a decode step must read (weights + KV of
every row) over the copy bandwidth measured at the start of the run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.pb import generate_pb2 as pb  # noqa: E402
from text_generation_server.pb import generate_pb2_grpc as pb_grpc  # noqa: E402

import make_model  # noqa: E402
import roofline  # noqa: E402
from ports import free_port  # noqa: E402


class Shards:
    """The shard's ranks (one process each; `--num-shard` N > 1 makes a tensor-parallel group),
    driven as the router drives them: every call goes to every rank at once, and rank 0's answer
    is read."""

    def __init__(self, model_dir: Path, uds: str, extra: list[str], num_shard: int = 1):
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "server") + ":"
                   + os.environ.get("PYTHONPATH", ""))
        group = []
        if num_shard > 1:
            group = [f"--world-size={num_shard}", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
        self.procs = [subprocess.Popen([sys.executable, "-m", "text_generation_server.cli", "serve", str(model_dir),
                                        f"--uds-path={uds}", *group, *([f"--rank={r}"] if group else []), *extra],
                                       env=env) for r in range(num_shard)]
        self.stubs = [pb_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{uds}-{r}", options=[
            ("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]))
            for r in range(num_shard)]
        for _ in range(2400):
            if any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError("a shard exited while starting")
            try:
                for stub in self.stubs:
                    stub.Health(pb.HealthRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError("the shards did not come up")

    def call(self, method: str, msg):
        """`method` on every rank at once; rank 0's answer."""
        if len(self.stubs) == 1:  # a plain call: one shard's step times as they were measured before
            return getattr(self.stubs[0], method)(msg)
        futures = [getattr(stub, method).future(msg) for stub in self.stubs]
        results = [f.result() for f in futures]
        return results[0]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


class Blocks:
    def __init__(self, block_size: int):
        self.bs, self.next = block_size, 0

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.bs)
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def request(rid: int, prompt: list[int], max_new: int, blocks: Blocks) -> pb.Request:
    bl = blocks.take(len(prompt) + max_new)
    bs = blocks.bs
    return pb.Request(
        id=rid, input_ids=prompt, blocks=bl, cache_locs=[bl[p // bs] * bs + p % bs for p in range(len(prompt))],
        parameters=pb.NextTokenChooserParameters(temperature=1, top_p=1, typical_p=1, repetition_penalty=1),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True))


def _median_ms(seconds: list[float]) -> float:
    """Median of the steps after the first two (those include concatenation), in ms."""
    return statistics.median(seconds[2:]) * 1e3


def run(model_dir: Path, batches: list[int], context: int, batch1_context: int, steps: int, vocab: int,
        shard_args: list[str], max_prefill: int = 8192, num_shard: int = 1) -> dict:
    """`num_shard` > 1: tensor parallelism over that many GPUs; the roofline is then the bytes a
    step reads over the copy bandwidth of all of them (each rank reads its share)."""
    ceilings = roofline.measure()
    shards = Shards(model_dir, f"/tmp/tessera-bench-{os.getpid()}", shard_args, num_shard)
    try:
        info = shards.call("Info", pb.InfoRequest())
        cfg = json.loads((model_dir / "config.json").read_text())
        blocks = Blocks(info.block_size)
        warm = [request(i, [1] * min(context, max_prefill), 1, blocks) for i in range(max(1, max_prefill // context))]
        shards.call("Warmup", pb.WarmupRequest(batch=pb.Batch(id=1 << 40, requests=warm), max_input_tokens=context,
                                     max_prefill_tokens=max_prefill, max_total_tokens=context + steps + 8))
        rng = np.random.default_rng(0)
        weights = make_model.weight_bytes(model_dir)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
        bw = ceilings.get("copy_bandwidth_TBps", 0) * 1e12 * num_shard
        out = {"ceilings": ceilings, "num_shard": num_shard, "weight_bytes": weights, "info": str(info).replace("\n", " "), "decode": [], "prefill": []}
        bid = 0
        for b in batches:
            ctx = batch1_context if b == 1 else context
            blocks.next = 0
            per = max(1, max_prefill // ctx)
            cached = []
            t_prefill = []
            for start in range(0, b, per):
                reqs = [request(start + i, rng.integers(0, vocab, ctx).tolist(), steps + 2, blocks) for i in range(min(per, b - start))]
                bid += 1
                t0 = time.perf_counter()
                resp = shards.call("Step", pb.StepRequest(prefill=pb.Batch(id=bid, requests=reqs, size=len(reqs))))
                t_prefill.append(time.perf_counter() - t0)
                cached.append(resp.batch)
            times, shard, forward, sample, req_bytes, resp_bytes = [], [], [], [], [], []
            for _ in range(steps):
                msg = pb.StepRequest(batch_ids=[c.id for c in cached])
                t0 = time.perf_counter()
                resp = shards.call("Step", msg)
                times.append(time.perf_counter() - t0)
                shard.append(resp.total_ns / 1e9)
                forward.append(resp.forward_ns / 1e9)
                sample.append(resp.sample_ns / 1e9)
                req_bytes.append(msg.ByteSize())
                resp_bytes.append(resp.ByteSize())
                cached = [resp.batch]
            shards.call("ClearCache", pb.ClearCacheRequest())
            step = statistics.median(times[2:])  # the first steps include concatenation
            step_weights, experts_hit = make_model.step_weight_bytes(model_dir, b)  # a mixture reads the experts hit
            read = step_weights + b * (ctx + steps // 2) * kv_per_token
            floor = read / bw if bw else float("nan")
            row = {"batch": b, "context": ctx, "step_ms": step * 1e3, "bytes_read": read, "experts_per_layer": experts_hit,
                   "roofline_all_weights_ms": (weights + b * (ctx + steps // 2) * kv_per_token) / bw * 1e3 if bw else None,
                   "roofline_ms": floor * 1e3, "roofline_ratio": floor / step if bw else None,
                   "tokens_per_s": b / step,
                   # Where a step's time goes: inside the shard's Step handler (the engine's inputs +
                   # forward, then sampling + the host sync), and outside it (gRPC, both ends).
                   "shard_ms": _median_ms(shard), "forward_ms": _median_ms(forward), "sample_ms": _median_ms(sample),
                   "grpc_ms": (step - statistics.median(shard[2:])) * 1e3,
                   "request_bytes": int(statistics.median(req_bytes)), "response_bytes": int(statistics.median(resp_bytes))}
            out["decode"].append(row)
            print(json.dumps(row), flush=True)
            if b == 1:
                out["prefill"].append({"batch": 1, "context": ctx, "prefill_ms": t_prefill[0] * 1e3})
        # TTFT floor at the shard: one 1k-token prefill, idle.
        blocks.next = 0
        t = []
        for i in range(5):
            req = request(i, rng.integers(0, vocab, 1024).tolist(), 1, blocks)
            bid += 1
            t0 = time.perf_counter()
            shards.call("Step", pb.StepRequest(prefill=pb.Batch(id=bid, requests=[req], size=1)))
            t.append(time.perf_counter() - t0)
            shards.call("ClearCache", pb.ClearCacheRequest())
            blocks.next = 0
        out["prefill_1k_ms"] = statistics.median(t[1:]) * 1e3
        return out
    finally:
        shards.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch1-context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-prefill", type=int, default=8192)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--num-shard", type=int, default=1, help="tensor-parallel ranks, one GPU each")
    ap.add_argument("shard_args", nargs="*", help="extra `serve` arguments, after --")
    a = ap.parse_args()
    vocab = json.loads((a.model_dir / "config.json").read_text())["vocab_size"]
    res = run(a.model_dir, [int(x) for x in a.batches.split(",")], a.context, a.batch1_context, a.steps, vocab,
              a.shard_args, a.max_prefill, a.num_shard)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text)
