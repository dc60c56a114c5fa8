#!/usr/bin/env bash
# One benchmark pass on a CUDA machine (see docs/benchmarks.md). Writes everything under $OUT.
# Env: NUM_SHARD (tensor-parallel ranks of the 8B server, default 1), RATES, N, SKIP_PROFILE, SKIP_SHARD.
# Expects: flashinfer importable, the Rust binaries in target/release, stubs built.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/../server:${PYTHONPATH:-}"
printf '#!/bin/sh\nexec python3 -m text_generation_server.cli "$@"\n' > /tmp/tgs && chmod +x /tmp/tgs
L=${LAUNCHER:-../target/release/text-generation-launcher}
serve() {  # model_dir port extra...
  local dir=$1 port=$2; shift 2
  $L --model-id "$dir" --server-bin /tmp/tgs --port "$port" --hostname 127.0.0.1 --shard-uds-path /tmp/tessera-$port "$@" &
  LPID=$!
  for _ in $(seq 600); do curl -sf "localhost:$port/health" >/dev/null && return 0; sleep 1; done; return 1
}
test -f /tmp/llama8b/config.json || python3 make_model.py llama-8b-shape /tmp/llama8b
test -f /tmp/smol/config.json || python3 make_model.py smollm2-135m /tmp/smol
[ "${SKIP_PROFILE:-0}" = 1 ] || timeout 150 python3 profile_step.py /tmp/llama8b > "$OUT/profile_b1.txt" 2>&1
serve /tmp/llama8b 3000 --num-shard "${NUM_SHARD:-1}" --max-input-tokens 1024 --max-total-tokens 2048 --max-batch-prefill-tokens 8192 --max-concurrent-requests 1024 > "$OUT/server_8b.log" 2>&1 || echo "8B server failed"
timeout 60 python3 load.py http://127.0.0.1:3000 --workload ttft --out "$OUT/ttft.json"
timeout 240 python3 load.py http://127.0.0.1:3000 --rates "${RATES:-inf,16,4}" --num-requests "${N:-1000}" --out "$OUT/w2.json"
kill -TERM $LPID; wait $LPID
serve /tmp/smol 3001 --max-input-tokens 1024 --max-total-tokens 2048 > "$OUT/server_smol.log" 2>&1
timeout 90 python3 load.py http://127.0.0.1:3001 --workload w4 --vocab 49152 --out "$OUT/w4_http.json"
kill -TERM $LPID; wait $LPID
[ "${SKIP_SHARD:-0}" = 1 ] || timeout 120 python3 shard_bench.py /tmp/smol --batches 1,64 --context 128 --batch1-context 128 --steps 64 --out "$OUT/w4_shard.json" > /dev/null 2>&1
ls -la "$OUT"
