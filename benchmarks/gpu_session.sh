#!/usr/bin/env bash
# One device call for the Triton kernels: GPU tests, config sweep, kernel benchmark, end-to-end
# decode. Every stage is time-boxed (`timeout`) so the whole script ends inside ~380 s; each stage
# copies its results to $OUT as soon as it ends, so a later stage that runs out of time loses
# only itself.
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh          # on the GPU machine, in the repo root
#
# $OUT gets (at most 8 files): session.log (everything printed), gpu_tests.log, tune_kernels.json,
# triton_configs.json (the shipped table merged with this sweep), bench_kernels.json,
# gpu_decode.json, ncu.txt. The .md tables are regenerated from the JSON by the scripts' to_markdown.
#
# GPU_SESSION_CASES=mma makes a short second call: the pytest subset TESTS_K (default "mma"), the
# batch-1..16 sweep (tune_kernels.MMA_CASES), bench without variants, decode; ~300 s.
#
# Stages and budgets (seconds):
#   1  env + import check                                     ~10
#   2  pytest tests/test_triton_kernels.py -n 6 (CUDA)   |    120 (in parallel with 3: nothing timed)
#   3  tune_kernels.py --warm-only, 9 shards             |    100
#   4  tune_kernels.py: the sweep, timed, writes the table    65
#   5  bench_kernels.py --warm-only, 10 shards                35
#   6  bench_kernels.py --variants with the new table         65
#   7  bench_kernels.py --decode (bf16, w2)                   up to 125, what is left
#   8  ncu on one mma launch (counters, if the runtime allows) 20, if time is left
set -u
OUT=${OUT:-/tmp/gpu_session_out}
TOTAL=${GPU_SESSION_BUDGET_S:-425}
mkdir -p "$OUT" /tmp/r
export PYTHONUNBUFFERED=1 PYTHONPATH=. FAIRY2I_KERNEL_CACHE=/tmp/fairy2i_kernels TRITON_CACHE_DIR=/tmp/triton_cache
unset TRITON_INTERPRET
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stage() { echo "=== [$(elapsed)s] $*"; }
left() { echo $(( TOTAL - $(elapsed) )); }
keep() { for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done; }

stage "1 env"
nvidia-smi -L || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
python3 -c "import fairy2i_compile.compiler.codegen.triton_packed as tp; print('import ok; MMA_MAX_M', tp.MMA_MAX_M)" \
  || { echo "IMPORT FAILED"; exit 1; }
cp fairy2i_compile/compiler/codegen/triton_configs.json /tmp/r/triton_configs.json

stage "2+3 GPU tests (pytest -n 6) and sweep compile (9 warm shards), side by side"
if [ "${GPU_SESSION_CASES:-}" = mma ]; then KSEL=(-k "${TESTS_K:-mma}"); VARIANTS=(); else KSEL=(); VARIANTS=(--variants); fi
( timeout 120 python3 -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider -n 6 -ra "${KSEL[@]}" \
    > /tmp/r/gpu_tests.log 2>&1; echo "pytest exit $?" >> /tmp/r/gpu_tests.log ) &
TESTS=$!
WARM=()
for i in 0 1 2 3 4 5 6 7 8; do
  timeout 100 python3 benchmarks/tune_kernels.py --warm-only --shard $i --shards 9 > /tmp/r/warm_tune_$i.log 2>&1 &
  WARM+=($!)
done
wait "${WARM[@]}"
stage "sweep compiled"; tail -n 2 /tmp/r/warm_tune_*.log | grep -v "^$" | head -40
wait $TESTS
stage "tests done"; tail -n 25 /tmp/r/gpu_tests.log
keep /tmp/r/gpu_tests.log

stage "4 sweep (timed)"
timeout 65 python3 benchmarks/tune_kernels.py --budget-s 50 --rep 20 --out /tmp/r/tune_kernels \
  --write-configs /tmp/r/triton_configs.json
echo "tune exit $?"
keep /tmp/r/tune_kernels.json /tmp/r/triton_configs.json
export FAIRY2I_TRITON_CONFIGS=/tmp/r/triton_configs.json

stage "5 bench compile (10 warm shards)"
WARM=()
for i in 0 1 2 3 4 5 6 7 8 9; do
  timeout 35 python3 benchmarks/bench_kernels.py "${VARIANTS[@]}" --batches 1,2,4,8,16,64,256 --warm-only --shard $i --shards 10 \
    > /tmp/r/warm_bench_$i.log 2>&1 &
  WARM+=($!)
done
wait "${WARM[@]}"
grep -h "warm:" /tmp/r/warm_bench_*.log | head -20

stage "6 bench (timed)"
timeout 65 python3 benchmarks/bench_kernels.py "${VARIANTS[@]}" --batches 1,2,4,8,16,64,256 --rep 25 \
  --out /tmp/r/bench_kernels
echo "bench exit $?"
keep /tmp/r/bench_kernels.json

if [ "$(left)" -gt 60 ]; then
  B=$(( $(left) - 20 )); CAP=${DECODE_MAX_S:-125}; [ $B -gt $CAP ] && B=$CAP
  stage "7 end-to-end decode (budget ${B}s), one process per configuration"
  for c in bf16 w2; do
    timeout $(( B / 2 )) python3 benchmarks/bench_kernels.py --decode --decode-configs $c --decode-tokens 48 \
      --out /tmp/r/gpu_decode_$c
    echo "decode $c exit $?"
    keep /tmp/r/gpu_decode_$c.json
  done
else
  stage "7 end-to-end decode skipped: $(left)s left"
fi

if [ "${GPU_SESSION_CASES:-}" != mma ] && [ "$(left)" -gt 22 ] && command -v ncu > /dev/null; then
  stage "8 ncu: one mma launch, 4096x11008, M = 1, T = 2"
  cat > /tmp/r/one_launch.py <<'EOF'
import torch, sys
sys.path.insert(0, "benchmarks")
from tune_kernels import make_case
from fairy2i_compile.compiler.codegen.triton_packed import choose_spec, launch_packed_linear
n, m, codes, scales, x, _ = make_case(4096, 11008, 1, 2)
spec = choose_spec(1, n, m, 2, 0, False, torch.bfloat16, False, False)
print(spec)
for _ in range(3):
    launch_packed_linear(spec, x, codes, scales, None, m)
torch.cuda.synchronize()
EOF
  timeout 20 ncu --clock-control none -k regex:fairy2i_mma -c 1 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section ComputeWorkloadAnalysis python3 /tmp/r/one_launch.py > /tmp/r/ncu.txt 2>&1
  echo "ncu exit $?"; tail -n 60 /tmp/r/ncu.txt
  keep /tmp/r/ncu.txt
fi
stage "done"
