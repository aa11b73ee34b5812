#!/usr/bin/env bash
# Every case of benchmarks/peers.py on one device in one go (about 6 minutes on one H200: below),
# with (CUDA) benchmarks/overhead.py and benchmarks/solver_cost.py, printed as one report and
# tee'd to a log ($LOG; by default in $OUT when that is set, else in $TMPDIR, so that a run
# stopped at a time limit still leaves what it printed).
#
#   benchmarks/gpu.sh [peers.py options]        # CUDA: ResNet-18, 16 batches of 256 inputs
#   benchmarks/gpu.sh --quick                   # smoke test: every script at tiny sizes
#   DEVICE=cpu benchmarks/gpu.sh --quick        # smoke test on CPU (peers.py alone)
#
# Order, most valuable first, so that a run cut short loses the least: issue 6's targets
# (peers.py's reference, top-k, trace, density and dataloader cases, then costs, whose block-1
# product is the last target), reduced precision, overhead.py, solver_cost.py, then peers.py's
# `many` case on its own. Time on an H200, from the twenty-third session's run (RESULTS.md,
# 2026-11-30, 295 s in all, each case's time in its log): startup and the peers' install ~15 s,
# reference 3, top-k 34, trace 3, density 26, dataloader 66, costs 20 (every target's numbers
# by ~170 s), precision 14; then overhead.py ~58 (295 s less the rest), solver_cost.py ~17, many
# ~40 (its own startup 8, float64 reference 16). Since then top-k also runs ours under
# cudnn.benchmark (one start each: a few seconds with cuDNN's search) and overhead.py has grown
# (cuDNN rows ~5 s, BatchNorm's formula, forward-over-forward probes, merged batches, the
# engine's share): ~330-370 s estimated, under gpu_session.sh's 420. Settings that took it from
# ~350 s before: top-k runs from $SEEDS random starts per tool (default 3, was 5), the
# dataloader case's from $DATALOADER_SEEDS (default 2, was 3: PyHessian's run takes 9 s there);
# `analyze`'s variants from one start, since our products did not vary with the seed where the
# peers' did; no dataloader blocks beside the default on CUDA (blocks 2 and 4 took 1.6x and
# 2.2x its time in all three H200 runs); the many case at $MANY_K = 20 eigenpairs (was 30).
# The peers (PyHessian, hessian-eigenthings) are installed, when the python in use lacks them,
# from the wheels in $WHEELS (default .whl/ at the repo root) into $SITE (default /tmp/site),
# without network. One that still does not import is named in one line and its rows fail (one
# line each), ours run: the device's time is spent either way, and our rows, overhead.py and
# solver_cost.py need no peer. The python is .venv's when there is one, else python3 ($PYTHON
# overrides).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${DEVICE:-cuda}"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/site}"
LOG="${LOG:-${OUT:-${TMPDIR:-/tmp}}/peers-$DEVICE.log}"
mkdir -p "$(dirname "$LOG")"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The peers that do not import, each with the last line of its error ("" when both do).
missing_peers() {
    local peer error
    for peer in pyhessian hessian_eigenthings; do
        error="$("$PYTHON" -c "import $peer" 2>&1)" || printf '%s (%s); ' "$peer" "${error##*$'\n'}"
    done
}

missing="$(missing_peers)"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ -n "$missing" ] && [ ${#wheels[@]} -gt 0 ]; then
    echo "# installing the peers from $WHEELS into $SITE"
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --target "$SITE" "${wheels[@]}"
    missing="$(missing_peers)"
fi
: > "$LOG"  # this run's log (appended to below)
if [ -n "$missing" ]; then
    echo "# gpu.sh: peers failed to import: ${missing%; }; their rows will fail, ours run;" \
        "put their wheels in $WHEELS (with network, at the repo root:" \
        "pip download --no-deps -d .whl pyhessian==0.1 hessian-eigenthings==1.0.0a5)" \
        | tee -a "$LOG" >&2
fi
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        | sed 's/^/# /' | tee -a "$LOG"
fi

# the solver's own cost at ResNet-18's size, products free (a diagonal operator)
solver_sizes=(--n 11181642 --k 5,50 --blocks default,1,4)
overhead_sizes=()
# --quick's sizes (peers.py's: one start per tool, many-k 4, the cnn model), unless set; on
# CUDA overhead.py and solver_cost.py too, which at full size took ~100 s of the smoke test
case " $* " in *" --quick "*)
    SEEDS="${SEEDS:-1}" DATALOADER_SEEDS="${DATALOADER_SEEDS:-1}" MANY_K="${MANY_K:-4}"
    solver_sizes=(--n 5418 --k 2,4 --blocks default,1)
    overhead_sizes=(--model cnn --batch 4 --batches 2 --reps 1) ;;
esac
peers=("$PYTHON" "$ROOT/benchmarks/peers.py" --device "$DEVICE" --seeds "${SEEDS:-3}"
    --dataloader-seeds "${DATALOADER_SEEDS:-2}" --many-k "${MANY_K:-20}")
start=$SECONDS
status=0
record() { [ "$status" -ne 0 ] || status=$1; }  # the first failure's exit status
# every case but many (a --cases of the caller's comes later and wins: then many is not run)
"${peers[@]}" --cases reference,top-k,trace,density,dataloader,costs,precision "$@" 2>&1 \
    | tee -a "$LOG"
record "${PIPESTATUS[0]}"
if [ "$DEVICE" = cuda ]; then  # where a product's time goes: launches, cuDNN, the solver
    "$PYTHON" "$ROOT/benchmarks/overhead.py" --device cuda "${overhead_sizes[@]}" 2>&1 \
        | tee -a "$LOG"
    record "${PIPESTATUS[0]}"
    "$PYTHON" "$ROOT/benchmarks/solver_cost.py" --device cuda "${solver_sizes[@]}" 2>&1 \
        | tee -a "$LOG"
    record "${PIPESTATUS[0]}"
fi
if [[ " $* " != *" --cases"* ]]; then  # last: no target rests on it
    "${peers[@]}" --cases many "$@" 2>&1 | tee -a "$LOG"
    record "${PIPESTATUS[0]}"
fi
echo "# gpu.sh: $((SECONDS - start)) s, exit status $status, log $LOG" | tee -a "$LOG"
exit "$status"
