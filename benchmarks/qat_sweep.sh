#!/usr/bin/env bash
# The QAT measurements behind benchmarks/results/qat_smollm2.{json,md}, in order.
# Every ablation row trains the same 20 steps x 512 tokens (10,240 tokens) from the
# same start, so rows compare "what helps per token"; the last run is the long one.
# Idempotent: a row already in the results JSON is skipped, and an interrupted run
# resumes from its checkpoint (benchmarks/qat_smollm2.py --checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=benchmarks/results/qat_smollm2.json
export HF_HUB_OFFLINE=1

done_already() {  # tag -> exit 0 if its row exists
  [ -f "$RESULTS" ] && $PY -c "import json,sys; sys.exit(0 if sys.argv[1] in json.load(open('$RESULTS'))['runs'] else 1)" "$1"
}
run() {  # tag, then qat_smollm2.py arguments
  local tag=$1; shift
  if done_already "$tag"; then echo "skip $tag (in $RESULTS)"; return; fi
  $PY benchmarks/qat_smollm2.py --no-progress --tag "$tag" "$@"
}
SHORT="--steps 20 --warmup 3"

# 1. learning rate (paper's 3e-5 and two larger ones), plain CE, per-tensor scales
for lr in 3e-5 3e-4 1e-3; do run "lr$lr" $SHORT --lr "$lr"; done
BEST=$($PY -c "
import json
runs = json.load(open('$RESULTS'))['runs']
print(min((r for t, r in runs.items() if t.startswith('lr')), key=lambda r: r['eval']['qat_ppl'])['tag'][2:])")
echo "best lr: $BEST"
# 2. one change at a time at that LR
run "distill0.5-lr$BEST" $SHORT --lr "$BEST" --distill-alpha 0.5
run "row-scales-lr$BEST" $SHORT --lr "$BEST" --granularity row
run "lm_head-real-lr$BEST" $SHORT --lr "$BEST" --keep-lm-head-real
# 3. the long run (>= 30 min) with what helped in 2 (lm_head stays converted, as in the paper)
FLAGS=$($PY -c "
import json
runs = json.load(open('$RESULTS'))['runs']
base = runs['lr$BEST']['eval']['qat_ppl']
flags = []
if runs['distill0.5-lr$BEST']['eval']['qat_ppl'] < base: flags.append('--distill-alpha 0.5')
if runs['row-scales-lr$BEST']['eval']['qat_ppl'] < base: flags.append('--granularity row')
print(' '.join(flags))")
echo "long run flags: $FLAGS"
run "long-w2" --lr "$BEST" $FLAGS --steps 170 --warmup 10 --eval-every 25 --time-budget-min 30
