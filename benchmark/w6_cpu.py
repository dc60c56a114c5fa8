"""W6: the default model on this CPU, the server against transformers' `generate`, in one run.

One chat request alone, then 16 concurrent chat requests of up to 64 new tokens, greedy, through
the real launcher over HTTP; then the same prompts through `generate` in this process (one request
alone; the 16 as one left-padded batch). Greedy decoding gives both the same tokens, and both stop
at the end-of-sequence token, so they do the same work. The server idles while transformers runs.

Ratios (docs/benchmarks.md): single-request latency server / transformers (goal <= 1.0), and
16-request throughput server / transformers (goal >= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from ports import free_port  # the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
# The request alone: one whose answer runs the whole 64 tokens.
SINGLE = "Write a short story about a robot who learns to paint."
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Why is the sky blue?", "Give me a synonym for happy.",
    "What language is spoken in Brazil?", "Describe a cat in one sentence.", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "What is photosynthesis?", "Suggest a name for a dog.",
    "What is the largest planet?", "How do you make tea?", "What does a compiler do?",
]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(ROOT / "target" / "release" / "text-generation-launcher"), "--port", str(port),
                             "--hostname", "127.0.0.1", "--shard-uds-path", f"/tmp/tessera-w6-{os.getpid()}",
                             "--disable-request-logging", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 600
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def server_one(url: str, prompt: str, max_new: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    r = requests.post(url + "/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": max_new, "details": True}}, timeout=600)
    r.raise_for_status()
    return [t["id"] for t in r.json()["details"]["tokens"]], time.perf_counter() - t0


def hf_generate(model, tok, prompts: list[str], max_new: int) -> tuple[list[list[int]], float]:
    """One left-padded batch, greedy; each row's tokens up to and including its end-of-sequence."""
    batch = tok(prompts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    took = time.perf_counter() - t0
    rows = []
    for row in out[:, batch.input_ids.shape[1]:].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t == tok.eos_token_id:
                break
        rows.append(ids)
    return rows, took


def scrape_step_times(url: str) -> dict:
    """Mean decode call (shard + gRPC, as the router sees it) and mean router time between two
    decode calls, in ms, from the router's /metrics."""
    values = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tessera_batch_") and ("_sum " in line or "_count " in line):
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)

    def mean_ms(h: str) -> float | None:
        n = values.get(f"{h}_count", 0)
        return values[f"{h}_sum"] / n * 1e3 if n else None

    return {"decode_call_ms": mean_ms("tessera_batch_decode_duration_seconds"),
            "router_between_decodes_ms": mean_ms("tessera_batch_router_duration_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="single-request runs each way (the median counts)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(subprocess.run([str(ROOT / ".venv" / "bin" / "text-generation-server"), "prepare-model"],
                                    capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    def chat(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    prompts = [chat(q) for q in QUESTIONS[:a.concurrent]]
    single = chat(SINGLE)

    proc, url = start_server([], a.out.with_suffix(".server.log"))
    try:
        server_one(url, prompts[0], 4)  # warm
        singles = [server_one(url, single, a.max_new_tokens) for _ in range(a.repeat)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as ex:
            many = list(ex.map(lambda p: server_one(url, p, a.max_new_tokens), prompts))
        many_wall = time.perf_counter() - t0
        step_times = scrape_step_times(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_generate(model, tok, [single], 4)  # warm
    hf_singles = [hf_generate(model, tok, [single], a.max_new_tokens) for _ in range(a.repeat)]
    hf_many, hf_many_wall = hf_generate(model, tok, prompts, a.max_new_tokens)

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    single_tokens = len(singles[0][0])
    same_single = all(s[0] == h[0][0] for s, h in zip(singles, hf_singles))
    same_many = sum(s[0] == h for s, h in zip(many, hf_many))
    server_tokens, hf_tokens = sum(len(t) for t, _ in many), sum(map(len, hf_many))
    res = {
        "workload": "W6", "threads": torch.get_num_threads(), "max_new_tokens": a.max_new_tokens,
        "single": {"tokens": single_tokens, "server_s": median([t for _, t in singles]),
                   "transformers_s": median([t for _, t in hf_singles]), "same_tokens": same_single},
        "concurrent": {"requests": len(prompts), "server_tokens": server_tokens, "transformers_tokens": hf_tokens,
                       "server_s": many_wall, "transformers_s": hf_many_wall, "same_tokens_rows": same_many,
                       "server_tok_per_s": server_tokens / many_wall, "transformers_tok_per_s": hf_tokens / hf_many_wall},
    }
    res["steps"] = step_times
    res["single_latency_ratio"] = res["single"]["server_s"] / res["single"]["transformers_s"]
    res["concurrent_throughput_ratio"] = res["concurrent"]["server_tok_per_s"] / res["concurrent"]["transformers_tok_per_s"]
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
