#!/usr/bin/env bash
# End to end on the embedded demo model, offline: decompose at two rank settings,
# shard the first for 2 ranks, evaluate it under torchrun (gloo) and the second alone.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL="--baseline demo --text demo --seqlen 256 --max-windows 40 --layer-tokens 256"

"$BIN/tuckerize" decompose --model demo --ranks 8,64,32 --out "$OUT/tucker-8-64-32" --overwrite
"$BIN/tuckerize" decompose --model demo --config configs/demo.yaml --out "$OUT/tucker-demo-config" --overwrite
"$BIN/tuckerize" shard "$OUT/tucker-8-64-32" --tp 2 --out "$OUT/tucker-8-64-32-tp2" --overwrite
"$BIN/torchrun" --nproc_per_node 2 --master-port "${MASTER_PORT:-29517}" -m tuckerize eval \
    --model "$OUT/tucker-8-64-32-tp2" --backend cpu $EVAL --json "$OUT/eval-8-64-32-tp2.json"
"$BIN/tuckerize" eval --model "$OUT/tucker-demo-config" --backend cpu $EVAL \
    --json "$OUT/eval-demo-config.json" --plot "$OUT/eval-demo-config.png"
