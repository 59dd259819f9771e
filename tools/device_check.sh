#!/usr/bin/env bash
# The one prepared device script: every GPU-side check in a single call, well inside 10 minutes.
# Built here by tools/build_device.sh (carried as .device/); run on the GPU machine from the
# repository root. Writes everything under $OUT; the summary is $OUT/report.md.
#   1. the card, driver and CUDA version (nvidia-smi)
#   2. NVRTC compiles every kernel for this card's architecture and sm_80/sm_90, no spills
#   3. GPU tests: each kernel vs its CPU twin, GEMMs, GPU forward vs CPU and fixtures, batch
#      invariance (tests/gpu.rs, SGPT_REQUIRE_GPU=1 so nothing skips); the forward again with
#      attention version 2 (SGPT_ATTENTION=tc)
#   4. the CPU path against the fixtures on this machine too (tests/golden.rs)
#   5. parity against PyTorch/transformers on this GPU at bloom-560m and bloom-7b1 shapes with
#      random weights, f16 and bf16 (tools/parity_torch.py)
#   6. speed at bloom-7b1 shape: the PyTorch fp16 baseline (tools/bench_torch_gpu.py), sgpt bench
#      on the same ids with the copy-bandwidth and GEMM ceilings, and sgpt bench kernels
#   7. sgpt serve under load on the GPU (tools/load_bench.py) and sgpt eval with the GPU search
set -uo pipefail
OUT=${OUT:-/tmp/sgpt-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SGPT_CUDA_INCLUDE=/usr/local/cuda/include SGPT_REPO_ROOT="$PWD"
export SGPT_REQUIRE_GPU=1 SGPT_REQUIRE_NVRTC=1 SGPT_CACHE_DIR=/tmp/sgpt-kernels
report="$OUT/report.md"
status=0
step() { echo "== $1" | tee -a "$OUT/log.txt"; }

{
  echo "# sgpt device run"
  echo
  echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M')"
  echo "- commit: $(cat .device/COMMIT 2>/dev/null || echo unknown)"
  echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
  echo "- CUDA (nvcc): $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"
  echo
} > "$report"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

run_tests() {  # name, binary, timeout, [test name filter]
  step "tests: $1"
  timeout "$3" "$2" --test-threads=1 --nocapture ${4:-} > "$OUT/test-$1.txt" 2>&1
  local rc=$?
  local summary; summary=$(grep -o 'test result: .*' "$OUT/test-$1.txt" | tail -n 1)
  if [ $rc = 0 ]; then
    echo "- tests/$1.rs: **passed** ($summary)" >> "$report"
  else
    status=1
    echo "- tests/$1.rs: **FAILED** (exit $rc${summary:+; $summary}), see test-$1.txt:" >> "$report"
    grep -E -A1 "panicked" "$OUT/test-$1.txt" | grep -v "^--$" | head -n 24 | sed 's/^/    /' >> "$report"
  fi
}
echo "## Tests" >> "$report"
run_tests nvrtc .device/tests/nvrtc 120
run_tests gpu .device/tests/gpu 180
# The whole forward again with attention version 2 (tensor cores), still on trial.
SGPT_ATTENTION=tc run_tests gpu-attention-tc .device/tests/gpu 90 forward_matches_cpu_and_reference
# ... and with CUDA graphs for small batches (SGPT_CUDA_GRAPHS=1), also on trial: capture + replay.
SGPT_CUDA_GRAPHS=1 run_tests gpu-graphs .device/tests/gpu 90 "forward_matches_cpu_and_reference repeated_batches_are_identical"
run_tests golden .device/tests/golden 60
grep -E "worst cosine|registers" "$OUT/test-gpu.txt" "$OUT/test-nvrtc.txt" 2>/dev/null | sed 's/^/    /' | head -n 12 >> "$report"

step "parity vs PyTorch"
echo -e "\n## Parity with transformers on this GPU (random weights)" >> "$report"
if timeout 240 python3 tools/parity_torch.py --sgpt .device/sgpt --shapes bloom-560m,bloom-7b1 \
     --json "$OUT/parity.json" --markdown "$OUT/parity.md" > "$OUT/parity.txt" 2>&1; then
  cat "$OUT/parity.md" >> "$report"
else
  status=1
  echo "**FAILED or timed out**; tail of parity.txt:" >> "$report"
  tail -n 25 "$OUT/parity.txt" | sed 's/^/    /' >> "$report"
fi

step "bench"
echo -e "\n## Speed at bloom-7b1 shape, random weights, f16 (the [speed] table)" >> "$report"
# The PyTorch baseline first (same ids, best batch size), then sgpt on the same ids with its
# ceilings measured in the same run, then every kernel against those ceilings.
if timeout 150 python3 tools/bench_torch_gpu.py --shape bloom-7b1 --texts 2048 \
     --write-ids "$OUT/ids.jsonl" --json "$OUT/torch.json" > "$OUT/torch.txt" 2>&1; then
  base="--baseline $OUT/torch.json"
else
  status=1; base=""
  echo "PyTorch baseline FAILED; tail of torch.txt:" >> "$report"; tail -n 8 "$OUT/torch.txt" | sed 's/^/    /' >> "$report"
fi
sed 's/^/    /' "$OUT/torch.txt" >> "$report"
ids="--texts 2048"; [ -s "$OUT/ids.jsonl" ] && ids="--ids $OUT/ids.jsonl"
timeout 150 .device/sgpt bench --shape bloom-7b1 --device cuda $ids $base \
  --json "$OUT/bench-7b1.json" > "$OUT/bench.txt" 2>&1 || status=1
sed 's/^/    /' "$OUT/bench.txt" >> "$report"
echo "    -- the same with attention version 2 and CUDA graphs (SGPT_ATTENTION=tc SGPT_CUDA_GRAPHS=1):" >> "$report"
SGPT_ATTENTION=tc SGPT_CUDA_GRAPHS=1 timeout 100 .device/sgpt bench --shape bloom-7b1 --device cuda $ids $base \
  --json "$OUT/bench-7b1-tc.json" > "$OUT/bench-tc.txt" 2>&1 || status=1
grep -E "throughput|latency|MFU|floor|baseline" "$OUT/bench-tc.txt" | sed 's/^/    /' >> "$report"
timeout 60 .device/sgpt bench kernels --shape bloom-7b1 --device cuda \
  --json "$OUT/kernels-7b1.json" > "$OUT/kernels.txt" 2>&1 || status=1
sed 's/^/    /' "$OUT/kernels.txt" >> "$report"
rm -f "$OUT/ids.jsonl"  # large and reproducible (seeded)

step "serve + eval"
echo -e "\n## sgpt serve under load (bloom-7b1 shape, GPU) and sgpt eval on the GPU" >> "$report"
if [ -d /tmp/sgpt-parity/bloom-7b1 ]; then
  timeout 120 python3 tools/load_bench.py --sgpt .device/sgpt --model /tmp/sgpt-parity/bloom-7b1 \
    --concurrency 1,16,64 --duration 5 > "$OUT/load.txt" 2>&1 || status=1
  tail -n 12 "$OUT/load.txt" | sed 's/^/    /' >> "$report"
fi
# The synthetic BEIR set with the shipped model: search on the GPU, metrics to compare with CI's.
timeout 60 .device/sgpt eval --model models/sgpt-tiny --data tests/fixtures/beir-synthetic --device cuda \
  --cache-dir /tmp/sgpt-eval-cache --metrics "$OUT/eval-gpu.json" > "$OUT/eval.txt" 2>&1 || status=1
sed 's/^/    /' "$OUT/eval.txt" | tail -n 12 >> "$report"
echo -e "\n## Result: $([ $status = 0 ] && echo 'all checks passed' || echo 'SOME CHECKS FAILED')" >> "$report"
cat "$report"
exit $status
