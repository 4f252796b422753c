#!/usr/bin/env bash
# The GPU check: one prepared command for an H100/H200 machine (≤ 7 minutes; see scripts/gpu_check.py).
#
#   scripts/gpu_check.sh OUTDIR            # on the GPU machine (its Python 3.12 + torch 2.11)
#   scripts/gpu_check.sh OUTDIR --dry-run  # on the CPU, reduced sizes: every stage runs (CI test)
#
# Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (plus one log per stage). Environment:
#   PYTHON            interpreter (default: .venv/bin/python when present, else python3)
#   WHEELS            folder of carried wheels (cog, coglet, requests...) installed into a private
#                     target on first use (default .whl/cog when present)
#   DSVL2_OFFICIAL    the official deepseek_vl2 package folder: also time the official code, with
#   DSVL2_OFFICIAL_PYTHONPATH  its transformers 4.38.2 wheels' target + the stand-ins' folder
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
out="$1"; shift
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python="$PWD/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
wheels="${WHEELS:-.whl/cog}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl > /dev/null 2>&1; then
    target=/tmp/dsvl2-gpu-check-wheels
    "$python" -m pip install -q --no-index --no-deps --target "$target" "$wheels"/*.whl
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$target/bin:$PATH"
fi
# coglet starts its worker as a bare `python`: make it this interpreter.
shim=$(mktemp -d); ln -s "$python" "$shim/python"; export PATH="$shim:$PATH"
exec "$python" scripts/gpu_check.py "$out" "$@"
