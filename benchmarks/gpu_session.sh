#!/usr/bin/env bash
# What one call of the device tool runs (about 9 minutes on an H200, under its 10-minute limit):
# the whole suite on CUDA (gpu_tests.sh), then every benchmark (gpu.sh), each under a time limit
# that leaves the other its share, then the lines worth reading at once. Everything lands in $OUT
# (pytest.log, peers-cuda.log), which the device tool brings back.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh        # device tool: carry [".whl"], timeout ~580
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OUT="${OUT:-${TMPDIR:-/tmp}/gpu-session}"
mkdir -p "$OUT"
WORKERS="${WORKERS:-16}" timeout "${TESTS_S:-210}" bash "$ROOT/benchmarks/gpu_tests.sh" > /dev/null
echo "# gpu_tests.sh: exit status $?"
LOG="$OUT/peers-cuda.log" timeout "${BENCH_S:-330}" bash "$ROOT/benchmarks/gpu.sh" > /dev/null
echo "# gpu.sh: exit status $? (124: cut at ${BENCH_S:-330} s)"
grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$OUT/pytest.log" | tail -30
grep -E "^# .*->|own share|BatchNorm|double backward|formula against|replayed|CUDA graph|v\^T H v|jvp of jvp|HVP over|cudnn|heuristics|peak memory|graphs kept|eigenpairs|failed" \
    "$OUT/peers-cuda.log"
exit 0  # the statuses are the lines above: the summary's last grep matching nothing is no failure
