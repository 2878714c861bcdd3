#!/usr/bin/env bash
# The main job, end to end: `mixloom serve` on the embedded default (SQLite, in-process bus,
# SmolLM2-135M on CPU), then through its HTTP API: create a tenant, upload a small real data
# set, submit a LoRA and a MixLoRA job, watch them train together in fused steps, download
# both adapters into OUT_DIR/adapters.
#
#   bash scripts/demo.sh [OUT_DIR]        (default: demo-out; STEPS=6 optimizer steps a job)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-demo-out}")
mkdir -p "$OUT"
export MIXLOOM_DATA_DIR="${MIXLOOM_DATA_DIR:-$OUT/server-data}"
unset MIXLOOM_DATABASE_URL MIXLOOM_REDIS_URL
PORT=${MIXLOOM_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

echo "== preparing the base model: SmolLM2-135M-Instruct (the first time on a machine it is converted from GGUF, about a minute)"
mixloom prepare

echo "== creating tenant (admin command) in $MIXLOOM_DATA_DIR"
KEY=$(mixloom tenants create "demo-$(date +%s)-$$")

echo "== starting: mixloom serve --port $PORT (log: $OUT/serve.log)"
mixloom serve --host 127.0.0.1 --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill "$SERVE" 2>/dev/null || true; wait "$SERVE" 2>/dev/null || true' EXIT

python scripts/demo.py --url "http://127.0.0.1:$PORT" --api-key "$KEY" --out "$OUT" --steps "${STEPS:-6}"
echo "== adapters in $OUT/adapters (server log: $OUT/serve.log)"
