#!/usr/bin/env bash
# End to end on the embedded demo model, offline: decompose, shard for 2 ranks, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$BIN/tuckerize" decompose --model demo --ranks 8,64,32 --out "$OUT/tucker" --overwrite
"$BIN/tuckerize" shard "$OUT/tucker" --tp 2 --out "$OUT/tucker-tp2" --overwrite
if "$BIN/tuckerize" eval --help >/dev/null 2>&1; then
  "$BIN/torchrun" --nproc_per_node 2 -m tuckerize eval --model "$OUT/tucker-tp2" --baseline demo --backend cpu
fi
