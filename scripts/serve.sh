#!/usr/bin/env bash
# Serve predict.py with Cog's own HTTP server (coglet), without Docker or the cog CLI.
#
#   scripts/serve.sh                                   # http://127.0.0.1:5000, weights/ (or download)
#   COG_WEIGHTS=/data/deepseek-vl2-tiny PORT=8080 HOST=0.0.0.0 scripts/serve.sh
#
# First writes .cog/openapi_schema.json (what `cog build` would generate), so the server checks
# inputs (HTTP 422) and answers /openapi.json. Environment: VENV (default .venv), HOST, PORT,
# COG_WEIGHTS, DSVL2_VARIANT, PREDICTOR (default predict.py:Predictor; predict.py:ConcurrentPredictor
# batches up to COG_MAX_CONCURRENCY=8 predictions), and any other variable predict.py reads.
set -euo pipefail

cd "$(dirname "$0")/.."
repo_root="$PWD"
venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "error: no Python at $venv/bin/python; create the venv first (see README)" >&2
    exit 1
fi

# coglet starts its worker as a bare `python`: the venv must come first on PATH.
export PATH="$repo_root/$venv/bin:$PATH"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

predictor="${PREDICTOR:-predict.py:Predictor}"
python scripts/make_openapi_schema.py --ref "$predictor" --output .cog/openapi_schema.json

export COG_PREDICT_TYPE_STUB="$predictor"
# ConcurrentPredictor batches up to 8 predictions (cog.yaml's concurrency.max in a built image);
# the default Predictor serves one at a time.
if [ "$predictor" = "predict.py:ConcurrentPredictor" ]; then
    export COG_MAX_CONCURRENCY="${COG_MAX_CONCURRENCY:-8}"
fi
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
export PORT="${PORT:-5000}"
echo "serving predict.py on http://${HOST:-127.0.0.1}:$PORT (health: /health-check)" >&2
exec python -m cog.server.http --host "${HOST:-127.0.0.1}"
