#!/usr/bin/env bash
# Serve predict.py with Cog's own HTTP server (coglet), without Docker or the cog CLI.
#
#   COG_WEIGHTS=weights/test-tiny scripts/serve.sh                   # a local checkpoint folder
#   COG_WEIGHTS=https://host/deepseek-vl2-tiny.tar scripts/serve.sh   # a tarball, fetched once
#   DSVL2_VARIANT=tiny scripts/serve.sh                             # download into weights/
#   PORT=8080 HOST=0.0.0.0 scripts/serve.sh
#
# Before starting it says which weights it will load; with no COG_WEIGHTS, no checkpoint in
# weights/ and no DSVL2_VARIANT it refuses (instead of downloading the 55 GB base model unasked)
# and lists the variants with their sizes. It writes .cog/openapi_schema.json (what `cog build`
# would generate), so the server checks inputs (HTTP 422) and answers /openapi.json.
# Environment: VENV (default .venv), HOST, PORT, COG_WEIGHTS, DSVL2_VARIANT, COG_MAX_CONCURRENCY
# (default 8, what `cog build` sets from @cog.concurrent), DSVL2_STREAMING (auto | collect).
set -euo pipefail

cd "$(dirname "$0")/.."
repo_root="$PWD"
venv="${VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
if [ ! -x "$venv/bin/python" ]; then
    echo "error: no Python at $venv/bin/python; create the venv first (see README)" >&2
    exit 1
fi

# coglet starts its worker as a bare `python`: the venv must come first on PATH.
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

python scripts/download_weights.py --plan >&2 || exit 2

python -m tools.make_openapi_schema --ref predict.py:Predictor --output .cog/openapi_schema.json

export COG_PREDICT_TYPE_STUB="predict.py:Predictor"
export COG_MAX_CONCURRENCY="${COG_MAX_CONCURRENCY:-8}"
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
export PORT="${PORT:-5000}"
echo "serving predict.py on http://${HOST:-127.0.0.1}:$PORT (health: /health-check)" >&2
exec python -m cog.server.http --host "${HOST:-127.0.0.1}"
