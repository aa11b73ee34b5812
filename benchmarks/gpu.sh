#!/usr/bin/env bash
# Every case of benchmarks/peers.py on one device in one go (under 5 minutes on one H100/H200),
# then (CUDA) benchmarks/overhead.py and benchmarks/solver_cost.py, printed as one report and
# tee'd to a log ($LOG; by default in $OUT when that is set, else in $TMPDIR, so that a run
# stopped at a time limit still leaves what it printed).
#
#   benchmarks/gpu.sh [peers.py options]        # CUDA: ResNet-18, 16 batches of 256 inputs
#   DEVICE=cpu benchmarks/gpu.sh --quick        # smoke test on CPU
#
# Top-k runs start from $SEEDS random starts per tool (default 5; the ratios use their means),
# the dataloader case's from $DATALOADER_SEEDS (default 3: PyHessian's run takes 9 s there).
# The many case (last) computes $MANY_K eigenpairs (default 30; 50 would add about a minute on an
# H200, estimated from the top-5 runs' products: the reference alone needs ~300 float64 products).
# The peers (PyHessian, hessian-eigenthings) are installed, when the python in use lacks them,
# from the wheels in $WHEELS (default .whl/ at the repo root) into $SITE (default /tmp/site),
# without network. The python is .venv's when there is one, else python3 ($PYTHON overrides).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${DEVICE:-cuda}"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/site}"
LOG="${LOG:-${OUT:-${TMPDIR:-/tmp}}/peers-$DEVICE.log}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import pyhessian, hessian_eigenthings" 2>/dev/null; then
    echo "# installing the peers from $WHEELS into $SITE"
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
        || echo "# could not install the peers: their cases will fail"
fi
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# /'
fi

start=$SECONDS
"$PYTHON" "$ROOT/benchmarks/peers.py" --device "$DEVICE" --seeds "${SEEDS:-5}" \
    --dataloader-seeds "${DATALOADER_SEEDS:-3}" --many-k "${MANY_K:-30}" "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ "$DEVICE" = cuda ]; then  # where a product's time goes: launches, cuDNN, the solver
    "$PYTHON" "$ROOT/benchmarks/overhead.py" --device cuda 2>&1 | tee -a "$LOG"
    overhead=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] || status=$overhead
    # the solver's own cost at ResNet-18's size, products free (a diagonal operator)
    "$PYTHON" "$ROOT/benchmarks/solver_cost.py" --device cuda --n 11181642 --k 5,50 \
        --blocks default,1,4 2>&1 | tee -a "$LOG"
    solver=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] || status=$solver
fi
echo "# gpu.sh: $((SECONDS - start)) s, exit status $status, log $LOG" | tee -a "$LOG"
exit "$status"
