#!/usr/bin/env bash
# W3 (multi-LoRA) on a CUDA machine: llama-8b-shape with 100 random rank-16 adapters on every
# projection; the W2 requests base-only and over N = 1, 8, 32, 100 adapters, in one server run.
# Expects what gpu_run.sh expects. Writes under $OUT.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/../server:${PYTHONPATH:-}"
printf '#!/bin/sh\nexec python3 -m text_generation_server.cli "$@"\n' > /tmp/tgs && chmod +x /tmp/tgs
L=${LAUNCHER:-../target/release/text-generation-launcher}
test -f /tmp/llama8b/config.json || python3 make_model.py llama-8b-shape /tmp/llama8b
test -f /tmp/adapters/a99/adapter_config.json || python3 make_adapters.py /tmp/llama8b /tmp/adapters --n 100 --rank 16
$L --model-id /tmp/llama8b --server-bin /tmp/tgs --port 3002 --hostname 127.0.0.1 --shard-uds-path /tmp/tessera-3002 \
  --max-input-tokens 1024 --max-total-tokens 2048 --max-batch-prefill-tokens 8192 --max-concurrent-requests 1024 \
  --adapter-source /tmp/adapters --max-active-adapters 100 --max-lora-rank 16 > "$OUT/server_w3.log" 2>&1 &
LPID=$!
for _ in $(seq 600); do curl -sf localhost:3002/health >/dev/null && break; sleep 1; done
timeout ${W3_TIMEOUT:-400} python3 load.py http://127.0.0.1:3002 --workload w3 --num-requests "${N:-500}" --out "$OUT/w3.json"
curl -s localhost:3002/metrics | grep -E "^tessera_adapter_(loads|evictions|load_failures)_total|^tessera_adapters_resident" > "$OUT/w3_metrics.txt"
kill -TERM $LPID; wait $LPID
