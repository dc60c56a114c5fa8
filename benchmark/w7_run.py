"""W7, prefix reuse: the same W7 requests (`load.py --workload w7`: requests sharing a long system
prompt, then two-turn conversations) against a server with the prefix cache and one without, one
after the other on this machine; writes both and the TTFT ratios.

  python benchmark/w7_run.py --out w7.json                       # the default model, on this CPU
  python benchmark/w7_run.py --out w7.json --model-id /tmp/llama8b --system-words 1000 --vocab 128256
      --server-bin /tmp/tgs --launcher .bin/text-generation-launcher     # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from w6_cpu import ROOT, start_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--chats", type=int, default=50)
    ap.add_argument("--system-words", type=int, default=250, help="~1k tokens of the default model's tokenizer")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapter", default=None, help="send every request on this adapter (W7 on one adapter)")
    ap.add_argument("server_args", nargs="*", help="extra launcher arguments, after --")
    a = ap.parse_args()
    base = ["--max-input-tokens", "2000", "--max-total-tokens", "2100", "--max-batch-prefill-tokens", "4096",
            *(["--model-id", a.model_id] if a.model_id else []), *a.server_args]
    res = {}
    for caching in ("on", "off"):
        proc, url = start_server([*base, "--prefix-caching", caching], a.out.with_suffix(f".{caching}.log"))
        try:
            out = a.out.with_suffix(f".{caching}.json")
            cmd = [sys.executable, str(ROOT / "benchmark" / "load.py"), url, "--workload", "w7", "--num-requests",
                   str(a.num_requests), "--w7-chats", str(a.chats), "--w7-system-words", str(a.system_words),
                   "--vocab", str(a.vocab), "--concurrency", str(a.concurrency), "--out", str(out)]
            if a.adapter:
                cmd += ["--adapter", a.adapter]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res[caching] = json.loads(out.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    on, off = res["on"], res["off"]
    res["ttft_p50_ratio_off_to_on"] = {
        "shared": off["shared"]["median_ttft_ms"] / on["shared"]["median_ttft_ms"],
        "second_turns": off["second_turns"]["median_ttft_ms"] / on["second_turns"]["median_ttft_ms"],
        "all": off["median_ttft_ms"] / on["median_ttft_ms"],
    }
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("ttft_p50_ratio_off_to_on",)} | {
        c: {"shared_ttft_p50_ms": res[c]["shared"]["median_ttft_ms"], "second_turn_ttft_p50_ms": res[c]["second_turns"]["median_ttft_ms"],
            "completed": res[c]["shared"]["completed"] + res[c]["second_turns"]["completed"]} for c in ("on", "off")}, indent=2))


if __name__ == "__main__":
    main()
