"""GPU check, stage ``cog``: Cog's HTTP server answering the demo prompt on this machine's device.

Writes a tiny random-weight checkpoint (reduced sizes: seconds to make), serves predict.py with
Cog's own server (``tests/cog_server.py``: schema written, venv first on PATH), sends demo.png
with the demo prompt in one synchronous ``POST /predictions`` and records the answer's status,
length, metrics and timings as JSON.

    python scripts/gpu_check_cog.py OUT.json
"""
from __future__ import annotations

import base64
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

DEMO_PROMPT = "Describe each stage of this <image> in detail"


def main() -> int:
    """Serve, predict once, write the JSON; exit 0 when the prediction succeeded."""
    out = Path(sys.argv[1])
    try:
        import cog  # noqa: F401
        from cog_server import cog_server
    except ImportError as error:
        out.write_text(json.dumps({"skipped": f"Cog is not installed here ({error}); carry the cog and coglet wheels"}))
        return 0
    from scripts.make_test_checkpoint import make_checkpoint

    image = "data:image/png;base64," + base64.b64encode((REPO_ROOT / "demo.png").read_bytes()).decode()
    with tempfile.TemporaryDirectory(prefix="gpu-check-cog-") as folder:
        checkpoint = make_checkpoint(Path(folder) / "tiny", variant="tiny", seed=0, eos_boost=0.0)
        start = time.perf_counter()
        with cog_server("predict.py:Predictor", weights=checkpoint, retry_busy=5.0) as server:
            setup_seconds = time.perf_counter() - start
            start = time.perf_counter()
            status, body = server.predict({"image": image, "prompt": DEMO_PROMPT, "max_length_tokens": 32,
                                           "temperature": 0})
            seconds = time.perf_counter() - start
            log_tail = server.log()[-2000:]
    text = "".join(body.get("output") or [])
    result = {"http_status": status, "status": body.get("status"), "error": body.get("error"),
              "output_chars": len(text), "metrics": body.get("metrics"), "setup_seconds": round(setup_seconds, 2),
              "prediction_seconds": round(seconds, 3), "server_log_tail": log_tail}
    ok = status == 200 and body.get("status") == "succeeded"
    metrics = body.get("metrics") or {}
    result["summary"] = (f"{'answered' if ok else 'FAILED'}: HTTP {status}, status {body.get('status')}, "
                         f"{metrics.get('output_token_count', '?')} tokens, TTFT {metrics.get('time_to_first_token', '?')} s, "
                         f"{metrics.get('tokens_per_second', '?')} tokens/s, {seconds:.2f} s for the request "
                         f"(tiny random-weight checkpoint, reduced sizes)")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
