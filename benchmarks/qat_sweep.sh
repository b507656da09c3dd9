#!/usr/bin/env bash
# The QAT measurements behind benchmarks/results/qat_smollm2.{json,md}, in order.
# Every ablation row trains the same 20 steps x 512 tokens (10,240 tokens) from the
# same start, so rows compare "what helps per token"; the last run is the long one.
# Resumable: rerunning skips nothing but continues any run whose checkpoint exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q="$PY benchmarks/qat_smollm2.py --no-progress --steps 20 --warmup 3"
export HF_HUB_OFFLINE=1

# 1. learning rate (paper's 3e-5 and two larger ones), plain CE, per-tensor scales
for lr in 3e-5 3e-4 1e-3; do $Q --tag "lr$lr" --lr "$lr"; done
BEST=$($PY - <<'PY'
import json
runs = json.load(open("benchmarks/results/qat_smollm2.json"))["runs"]
best = min((r for t, r in runs.items() if t.startswith("lr")), key=lambda r: r["eval"]["qat_ppl"])
print(best["train"]["lr"])
PY
)
echo "best lr: $BEST"
# 2. one change at a time at that LR
$Q --tag "distill0.5-lr$BEST" --lr "$BEST" --distill-alpha 0.5
$Q --tag "row-scales-lr$BEST" --lr "$BEST" --granularity row
$Q --tag "lm_head-real-lr$BEST" --lr "$BEST" --keep-lm-head-real
# 3. the long run (>= 30 min) with what helped in 2 (lm_head stays converted, as in the paper)
FLAGS=$($PY - "$BEST" <<'PY'
import json, sys
runs = json.load(open("benchmarks/results/qat_smollm2.json"))["runs"]
lr = sys.argv[1]
base = runs[f"lr{lr}"]["eval"]["qat_ppl"] if f"lr{lr}" in runs else min(r["eval"]["qat_ppl"] for t, r in runs.items() if t.startswith("lr"))
flags = []
if runs[f"distill0.5-lr{lr}"]["eval"]["qat_ppl"] < base:
    flags.append("--distill-alpha 0.5")
if runs[f"row-scales-lr{lr}"]["eval"]["qat_ppl"] < base:
    flags.append("--granularity row")
print(" ".join(flags))
PY
)
echo "long run flags: $FLAGS"
$PY benchmarks/qat_smollm2.py --no-progress --tag "long-w2" --lr "$BEST" $FLAGS \
    --steps 170 --warmup 10 --eval-every 25 --time-budget-min 33
