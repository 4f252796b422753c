"""GPU check, stage ``cog``: Cog's HTTP server answering the demo prompt on this machine's device.

Writes a tiny random-weight checkpoint (reduced sizes: seconds to make), serves predict.py with
Cog's own server (``python -m cog.server.http``, this interpreter's folder first on PATH: coglet
starts its worker as a bare ``python``), sends demo.png with the demo prompt in one synchronous
``POST /predictions`` and records the answer's status, length, metrics and timings as JSON. Only
the standard library talks HTTP (the GPU machine may have no ``requests``).

    python scripts/gpu_check_cog.py OUT.json
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT)]

from scripts.gpu_check import stop_group  # noqa: E402

DEMO_PROMPT = "Describe each stage of this <image> in detail"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, body: Optional[dict] = None, timeout: float = 10) -> tuple[int, dict]:
    """GET (or POST ``body`` as JSON) and return (status, parsed JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def serve_and_predict(checkpoint: Path, workdir: Path, inputs: dict) -> dict:
    """Start Cog's server on predict.py, wait for READY, predict once, stop it; figures as a dict."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "COG_WEIGHTS": str(checkpoint),
           "COG_PREDICT_TYPE_STUB": f"{REPO_ROOT / 'predict.py'}:Predictor",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    log_path = workdir / "server.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=workdir,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        status = "not answering"
        while status not in ("READY", "SETUP_FAILED") and server.poll() is None:
            time.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):
                status = http_json(f"{base}/health-check")[1].get("status", "?")
        setup_seconds = time.perf_counter() - start
        if status != "READY":
            return {"setup_status": status, "server_log_tail": log_path.read_text(errors="replace")[-3000:]}
        start = time.perf_counter()
        code, body = http_json(f"{base}/predictions", {"input": inputs}, timeout=600)
        seconds = time.perf_counter() - start
    finally:
        stop_group(server)
    return {"http_status": code, "status": body.get("status"), "error": body.get("error"),
            "output_chars": len("".join(body.get("output") or [])), "metrics": body.get("metrics"),
            "setup_seconds": round(setup_seconds, 2), "prediction_seconds": round(seconds, 3),
            "server_log_tail": log_path.read_text(errors="replace")[-2000:]}


def main() -> int:
    """Serve, predict once, write the JSON; exit 0 when the prediction succeeded."""
    out = Path(sys.argv[1])
    try:
        import cog  # noqa: F401
    except ImportError as error:
        out.write_text(json.dumps({"skipped": f"Cog is not installed here ({error}); carry the cog and coglet wheels"}))
        return 0
    from scripts.make_test_checkpoint import make_checkpoint

    image = "data:image/png;base64," + base64.b64encode((REPO_ROOT / "demo.png").read_bytes()).decode()
    inputs = {"image": image, "prompt": DEMO_PROMPT, "max_length_tokens": 32, "temperature": 0}
    with tempfile.TemporaryDirectory(prefix="gpu-check-cog-") as folder:
        checkpoint = make_checkpoint(Path(folder) / "tiny", variant="tiny", seed=0, eos_boost=0.0)
        result = serve_and_predict(checkpoint, Path(folder), inputs)
    ok = result.get("http_status") == 200 and result.get("status") == "succeeded"
    metrics = result.get("metrics") or {}
    result["summary"] = (f"{'answered' if ok else 'FAILED'}: HTTP {result.get('http_status')}, status "
                         f"{result.get('status', result.get('setup_status'))}, {metrics.get('output_token_count', '?')} "
                         f"tokens, TTFT {metrics.get('time_to_first_token', '?')} s, "
                         f"{metrics.get('tokens_per_second', '?')} tokens/s, {result.get('prediction_seconds', '?')} s "
                         "for the request (tiny random-weight checkpoint, reduced sizes)")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
