#!/usr/bin/env bash
# End to end on the embedded demo model, offline, the recommended path: calibrate on the
# demo text, allocate ranks to keep 75% of the routed-expert parameters (per-expert
# weighted Tucker, the default method), shard for 2 ranks, evaluate under torchrun (gloo)
# against the original model.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL="--baseline demo --text demo --seqlen 256 --max-windows 40 --layer-tokens 256"

"$BIN/tuckerize" decompose --model demo --calibration demo --samples 32 --seqlen 256 --ratio 0.75 \
    --out "$OUT/tucker-keep0.75" --save-config "$OUT/demo-keep0.75.yaml" --overwrite
"$BIN/tuckerize" shard "$OUT/tucker-keep0.75" --tp 2 --out "$OUT/tucker-keep0.75-tp2" --overwrite
"$BIN/torchrun" --nproc_per_node 2 --master-port "${MASTER_PORT:-29517}" -m tuckerize eval \
    --model "$OUT/tucker-keep0.75-tp2" --backend cpu $EVAL --json "$OUT/eval-keep0.75-tp2.json"
