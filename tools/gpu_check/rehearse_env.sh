#!/usr/bin/env bash
# Rehearse the GPU check on the CPU in the GPU machine's package set (not in CI: several GB).
#
#   tools/gpu_check/rehearse_env.sh [OUTDIR]            # build/reuse the venv, carry the wheels, dry run
#   tools/gpu_check/rehearse_env.sh OUTDIR --compiles   # also: seconds per decode-step compile at 12 and 30 layers
#   tools/gpu_check/rehearse_env.sh OUTDIR --suite      # also: the whole test suite once in that package set
#                                                   #   (+ cog, coglet, pytest, requests, PyYAML; a second venv)
#
# The venv (GPU_ENV, default /work/envs/gpu312, outside the repository) has exactly what the GPU
# machine has: Python 3.12, torch 2.11.0, torchvision 0.26.0, transformers 5.17.0, tokenizers
# 0.23.2, timm 1.0.31, pillow 12.3.0, numpy, safetensors, huggingface_hub — no cog, no pytest.
# The carried wheels (.whl/cog, the same folder a device call carries) are downloaded for
# CPython 3.12 if absent and installed by tools/gpu_check/gpu_check.sh exactly as on the device (only the
# distributions the venv lacks, into a fresh private target). Then `tools/gpu_check/gpu_check.sh OUTDIR
# --dry-run` runs end to end; the script fails unless it exits 0 and every stage reported figures.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out="${1:-/tmp/gpu-rehearsal}"; shift || true
env_dir="${GPU_ENV:-/work/envs/gpu312}"
python312="${PYTHON312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}"
log_dir="$(dirname "$env_dir")/logs"; mkdir -p "$log_dir"
GPU_SET=(torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 tokenizers==0.23.2 timm==1.0.31 pillow==12.3.0
         numpy safetensors huggingface_hub)
CARRIED=(cog==0.23.1 coglet==0.23.1 structlog PyYAML==6.0.3 requests==2.34.2 urllib3 idna charset_normalizer certifi
         typing_extensions pytest==9.2.0 pluggy iniconfig packaging pygments)

make_env() {  # make_env DIR EXTRA...: a venv with the GPU set (+ extras), reused when present
    local dir="$1"; shift
    if ! "$dir/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then
        echo "building $dir (torch 2.11.0 from the registry: several GB; log $log_dir/$(basename "$dir")-install.log)"
        "$python312" -m venv "$dir" || return 1
        "$dir/bin/python" -m pip install "${GPU_SET[@]}" "$@" > "$log_dir/$(basename "$dir")-install.log" 2>&1 || return 1
    elif [ $# -gt 0 ]; then
        "$dir/bin/python" -m pip install -q "$@" || return 1
    fi
}

make_env "$env_dir" || { echo "could not build $env_dir" >&2; exit 1; }
if "$env_dir/bin/python" -c 'import cog' 2>/dev/null || "$env_dir/bin/python" -c 'import pytest' 2>/dev/null; then
    echo "$env_dir has cog or pytest: it is not the GPU machine's set" >&2; exit 1
fi
if ! ls .whl/cog/*.whl > /dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl/cog "${CARRIED[@]}" || { echo "could not download the carried wheels" >&2; exit 1; }
fi
echo "carried: $(du -sh .whl/cog | cut -f1) in $(ls .whl/cog/*.whl | wc -l) wheels"
"$env_dir/bin/python" - <<'PY'
import platform
from importlib.metadata import version
print("rehearsal venv: python", platform.python_version(), *(f"{p} {version(p)}" for p in (
    "torch", "torchvision", "transformers", "tokenizers", "timm", "pillow", "numpy", "safetensors", "huggingface_hub")))
PY

if [[ " $* " == *" --compiles "* ]]; then  # seconds per compile of the decode step (sizes the GPU stage limits)
    for layers in 12 30; do
        env -u PYTHONPATH "$env_dir/bin/python" -m tools.benchmark --size reduced --layers "$layers" --vision-layers 1 \
            --modes compiled --new-tokens 3 --repeats 1 --threads 2 --image none --json \
            --jsonl "$log_dir/compiles-$layers.jsonl" > /dev/null || echo "compile measurement at $layers layers failed" >&2
        grep '"warmup"' "$log_dir/compiles-$layers.jsonl" | tail -2
    done
fi

rm -rf "$out" /tmp/dsvl2-gpu-check-wheels  # the device machine starts bare
start=$(date +%s)
env -u PYTHONPATH PYTHON="$env_dir/bin/python" WHEELS=.whl/cog tools/gpu_check/gpu_check.sh "$out" --dry-run
status=$?
echo "dry run: exit $status in $(( $(date +%s) - start )) s"
"$env_dir/bin/python" - "$out" <<'PY' || status=1
import json, sys
report = json.load(open(f"{sys.argv[1]}/gpu_check.json"))
problems = []
for stage, result in report.items():
    if stage == "meta" or isinstance(result.get("skipped"), str):
        continue
    if result.get("error") or result.get("timed_out") or result.get("exit_code") not in (0, None):
        problems.append(f"{stage}: {result.get('error') or result.get('exit_code')}")
    if stage.startswith("speed:") and not (result.get("complete") and result.get("rows") and result.get("sampled")):
        problems.append(f"{stage}: no complete figures")
    if stage == "cog" and len(result.get("requests", [])) != 2:
        problems.append("cog: not two answers")
    if stage == "parity" and not result.get("passed"):
        problems.append("parity: nothing passed")
print("every stage reported figures" if not problems else "PROBLEMS: " + "; ".join(problems))
sys.exit(1 if problems else 0)
PY

if [[ " $* " == *" --suite "* ]]; then  # the whole suite once, in the GPU set plus the test tools
    suite_env="${GPU_SUITE_ENV:-${env_dir}-suite}"
    make_env "$suite_env" cog==0.23.1 coglet==0.23.1 pytest==9.2.0 requests==2.34.2 PyYAML==6.0.3 || exit 1
    echo "suite on commit $(git rev-parse --short HEAD): log $log_dir/suite.log"
    # DSVL2_PACKAGE_SET: the pin check (requirements.txt == installed) skips, saying why
    env -u PYTHONPATH DSVL2_PACKAGE_SET=gpu-rehearsal timeout 3000 "$suite_env/bin/python" -m pytest -q -rfs tests \
        > "$log_dir/suite.log" 2>&1
    echo "suite: exit $?; $(tail -1 "$log_dir/suite.log")"
fi
exit "$status"
