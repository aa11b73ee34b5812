#!/usr/bin/env bash
# The whole test suite on a CUDA machine, where the commands' `auto` device resolves to CUDA, in
# parallel (pytest-xdist, on the H200 image), each test's name and outcome printed as it ends:
# a run stopped at a time limit keeps them (the twenty-third session's `-q` run, cut at 170 s,
# lost the names of its 13 failures). Tee'd to $LOG ($OUT/pytest.log where OUT is set).
#
#   benchmarks/gpu_tests.sh                  # about 3-4 minutes with 12 workers on the H200
#   benchmarks/gpu_tests.sh tests/test_cuda.py tests/test_training.py
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="${LOG:-${OUT:-${TMPDIR:-/tmp}}/pytest.log}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$ROOT"
# the package's metadata (hessian-cli --version), without network
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "# gpu_tests.sh: the editable install failed: the --version test will fail"
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n "${WORKERS:-12}"); fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tests)
"$PYTHON" -m pytest -v -rfE -p no:cacheprovider "${parallel[@]}" "${targets[@]}" 2>&1 \
    | tee "$LOG" | grep -E "FAILED|ERROR|[0-9]+ (passed|failed)"
exit "${PIPESTATUS[0]}"
