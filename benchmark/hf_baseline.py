"""W5: the W2 requests through transformers' `generate` on the same GPU, as a user would write it:
static batches of 64, left-padded, greedy, each batch run to its longest output."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from load import sharegpt_like


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--num-requests", type=int, default=128, help="the first N requests of W2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(device).eval()
    reqs = sharegpt_like(a.num_requests, 0, vocab=a.vocab)
    t0 = time.perf_counter()
    out_tokens = 0
    for start in range(0, len(reqs), a.batch):
        chunk = reqs[start:start + a.batch]
        prompts = [[int(w[1:]) for w in p.split()] for p, _, _ in chunk]
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        longest = max(o for _, _, o in chunk)
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=0)
        out_tokens += sum(o for _, _, o in chunk)  # tokens the requests asked for; the padding work is waste
        print(f"batch {start // a.batch}: {time.perf_counter() - t0:.1f}s, longest {longest}", flush=True)
    duration = time.perf_counter() - t0
    res = {"system": "transformers.generate (static batches)", "batch": a.batch, "completed": len(reqs),
           "duration": duration, "request_throughput": len(reqs) / duration, "output_throughput": out_tokens / duration}
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
