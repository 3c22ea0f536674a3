#!/usr/bin/env bash
# End to end on the embedded demo model, offline, the path we recommend for a smaller
# checkpoint: calibrate on the demo text, allocate ranks to keep 85% of the routed-expert
# parameters (per-expert weighted Tucker, the default method), store the factors as int8 with
# int4 cores (settings chosen on the selection split of the held-out text only:
# bench/demo_settings.py), shard for 2 ranks, evaluate under torchrun (gloo) against the
# original model on the report split: windows 50-198 of the held-out text (--skip-windows 50
# leaves out windows 0-49, the text the settings were chosen on). eval's last line says it
# in short: the experts' stored bytes and the perplexity, against the original.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL="--baseline demo --text demo --seqlen 256 --skip-windows 50 --layer-tokens 256"
TUCKER="$OUT/tucker"

"$BIN/tuckerize" decompose --model demo --calibration demo --samples 128 --seqlen 256 --ratio 0.85 \
    --factor-dtype int8,core=int4 --out "$TUCKER" --overwrite
"$BIN/tuckerize" shard "$TUCKER" --tp 2 --out "$TUCKER-tp2" --overwrite
"$BIN/torchrun" --nproc_per_node 2 --master-port "${MASTER_PORT:-29517}" -m tuckerize eval \
    --model "$TUCKER-tp2" --backend cpu $EVAL --json "$OUT/eval-tp2.json"
