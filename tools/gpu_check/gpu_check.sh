#!/usr/bin/env bash
# The GPU check: two prepared device calls of at most 8 minutes each (tools/gpu_check/check.py).
#
#   tools/gpu_check/gpu_check.sh OUTDIR --call 1    # on the GPU machine: preflight, parity, tiny, small, official small
#   tools/gpu_check/gpu_check.sh OUTDIR --call 2    # on the GPU machine: preflight, base, Cog's server
#   tools/gpu_check/gpu_check.sh OUTDIR --dry-run   # on the CPU, reduced sizes: every stage (CI test)
#
# Writes OUTDIR/events.jsonl (a line per figure, as measured), gpu_check.json, gpu_check.md and
# logs.tar.gz. Environment:
#   PYTHON            interpreter (default: .venv/bin/python when present, else python3)
#   WHEELS            folder of carried wheels (cog, coglet, pytest...; default .whl/cog): only those
#                     whose distribution this interpreter lacks are installed, into a private target
#                     on PYTHONPATH (so a carried typing_extensions never shadows the machine's
#                     own); pip failing falls back to unpacking them; the check goes on regardless
#   DSVL2_OFFICIAL    the official deepseek_vl2 package folder: also time the official code, with
#   DSVL2_OFFICIAL_PYTHONPATH  its transformers 4.38.2 wheels' target + the stand-ins' folder
#                     (default: from the carried .whl/ref/dsvl2 and .whl/official, when present)
#   DSVL2_SHARED_DIR  the fixtures and tools (default ../shared, else the carried .whl/shared)
set -uo pipefail  # no -e: a failed step is reported and the check goes on
cd "$(dirname "$0")/../.." || exit 2
if [ $# -lt 1 ]; then
    echo "usage: tools/gpu_check/gpu_check.sh OUTDIR [--call 1|2] [--dry-run]" >&2
    exit 2
fi
out="$1"; shift
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python="$PWD/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
wheels="${WHEELS:-.whl/cog}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl > /dev/null 2>&1; then
    target="${WHEELS_TARGET:-/tmp/dsvl2-gpu-check-wheels}"
    # Only the wheels whose distribution the interpreter does not have.
    mapfile -t missing < <("$python" - "$wheels" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    try:
        version(wheel.name.split("-")[0])
    except PackageNotFoundError:
        print(wheel)
PY
)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${#missing[@]} carried wheel(s) the machine lacks into $target: ${missing[*]##*/}"
        if ! "$python" -m pip install -q --no-index --no-deps --no-compile --target "$target" "${missing[@]}"; then
            echo "warning: pip could not install the carried wheels; unpacking them instead" >&2
            for wheel in "${missing[@]}"; do "$python" -m zipfile -e "$wheel" "$target" || echo "warning: $wheel not unpacked" >&2; done
        fi
    fi
    # The target holds only distributions the interpreter lacks, so on the path it shadows none.
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$PATH:$target/bin"
fi
# The carried copies of ../shared (fixtures, the official tool) and of the official code.
if [ -z "${DSVL2_SHARED_DIR:-}" ] && [ ! -d ../shared ] && [ -d .whl/shared ]; then
    export DSVL2_SHARED_DIR="$PWD/.whl/shared"
fi
if [ -z "${DSVL2_OFFICIAL:-}" ] && [ -d .whl/ref/dsvl2 ] && ls .whl/official/*.whl > /dev/null 2>&1; then
    official=/tmp/dsvl2-official  # its own target: transformers 4.38.2 must not shadow ours
    rm -rf "$official"
    if "$python" -m pip install -q --no-index --no-deps --no-compile --target "$official" .whl/official/*.whl; then
        export DSVL2_OFFICIAL="$PWD/.whl/ref/dsvl2" DSVL2_OFFICIAL_PYTHONPATH="$official:$PWD/.whl/ref"
    else
        echo "warning: the official code's wheels did not install: its stage is skipped" >&2
    fi
fi
# coglet starts its worker as a bare `python`: make it this interpreter.
shim=$(mktemp -d); ln -s "$python" "$shim/python"; export PATH="$shim:$PATH"
exec "$python" -m tools.gpu_check.check "$out" "$@"
