"""GPU check, stage ``cog``: Cog's HTTP server answering on this machine's device.

Writes a tiny random-weight checkpoint (reduced sizes: seconds to make), serves predict.py with
Cog's own server (``python -m cog.server.http``, this interpreter's folder first on PATH: coglet
starts its worker as a bare ``python``) with its own warm-up budget (``DSVL2_WARMUP_SECONDS``,
half of ``--seconds``: past it setup falls back to the eager step), then sends demo.png with the demo prompt twice in synchronous
``POST /predictions``: greedy (temperature 0), then sampled (temperature 0.7, top_p 0.9). Each
answer's status, length, metrics and timings is one JSON line (``--events``) as soon as it is
known, and all of it goes to OUT.json. The server and its worker are ended when the stage ends,
when ``--seconds`` have passed, or on SIGTERM (the check's limit). Only the standard library talks
HTTP (the GPU machine may have no ``requests``).

    python -m tools.gpu_check.cog_stage OUT.json [--events EVENTS.jsonl] [--seconds 90]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

from tools.gpu_check.check import stop_group  # noqa: E402

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


REQUESTS = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.7, "top_p": 0.9, "seed": 1}}


def emit(events: Optional[Path], event: str, **fields) -> None:
    """Append one line to the check's events file now (nothing without one)."""
    if events is not None:
        with open(events, "a") as handle:
            handle.write(json.dumps({"stage": "cog", "event": event, "time": round(time.time(), 2), **fields},
                                    default=str) + "\n")


def log_message(line: str) -> str:
    """The message of one server log line: coglet writes JSON (``fields.message``), else the line itself."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(line)["fields"]["message"]).strip()
    return line.strip()


def serve_and_predict(checkpoint: Path, workdir: Path, inputs: dict, seconds: float,
                      events: Optional[Path] = None) -> dict:
    """Start Cog's server on predict.py, wait for READY, send the greedy then the sampled request,
    stop it (whatever happens, by ``seconds`` at the latest); figures as a dict."""
    deadline = time.monotonic() + seconds
    port = free_port()
    env = {**os.environ, "PORT": str(port), "COG_WEIGHTS": str(checkpoint),
           "COG_PREDICT_TYPE_STUB": f"{REPO_ROOT / 'predict.py'}:Predictor",
           "DSVL2_WARMUP_SECONDS": os.environ.get("DSVL2_WARMUP_SECONDS", str(round(seconds / 2))),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    log_path = workdir / "server.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=workdir,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(signum: int, _frame) -> None:  # the check's limit: end the server and its worker first
        stop_group(server, grace=3)  # well inside the 10 s the check gives this process
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"warmup_budget_seconds": float(env["DSVL2_WARMUP_SECONDS"]), "requests": []}
    try:
        status = "not answering"
        while status not in ("READY", "SETUP_FAILED") and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):
                status = http_json(f"{base}/health-check")[1].get("status", "?")
        result.update(setup_status=status, setup_seconds=round(time.perf_counter() - start, 2))
        emit(events, "setup", status=status, seconds=result["setup_seconds"])
        if status == "READY":
            for name, params in REQUESTS.items():
                left = deadline - time.monotonic()
                if left < 1:
                    break
                t0 = time.perf_counter()
                code, body = None, {}
                # coglet 0.23.1 answers a transient 409 (busy) just after a prediction: retry like a client
                while code in (None, 409) and time.monotonic() < deadline - 1:
                    if code == 409:
                        time.sleep(0.25)
                    with contextlib.suppress(OSError, ValueError):  # a timeout is recorded as no answer
                        code, body = -1, {}
                        code, body = http_json(f"{base}/predictions", {"input": {**inputs, **params}},
                                               timeout=max(1.0, deadline - time.monotonic()))
                code = None if code == -1 else code
                answer = {"request": name, **params, "http_status": code, "status": body.get("status"),
                          "error": body.get("error"), "output_chars": len("".join(body.get("output") or [])),
                          "metrics": body.get("metrics"), "seconds": round(time.perf_counter() - t0, 3)}
                result["requests"].append(answer)
                emit(events, "prediction", **answer)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_group(server)
    text = log_path.read_text(errors="replace")
    result["server_log_tail"] = text[-2500:]
    result["setup_phases"] = [message for message in map(log_message, text.splitlines())  # Service.start's phases
                              if message.startswith(("setup phase ", "setup total: "))]
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """Serve, predict greedy and sampled, write the JSON; exit 0 when both succeeded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--events", type=Path, help="append JSON lines here as figures come")
    parser.add_argument("--seconds", type=float, default=90.0, help="end everything by then")
    args = parser.parse_args(argv)
    try:
        import cog  # noqa: F401
    except ImportError as error:
        args.out.write_text(json.dumps({"skipped": f"Cog is not installed here ({error}); carry the cog and coglet "
                                                   "wheels"}))
        return 0
    from tools.checkpoints import make_checkpoint

    image = "data:image/png;base64," + base64.b64encode((REPO_ROOT / "demo.png").read_bytes()).decode()
    inputs = {"image": image, "prompt": DEMO_PROMPT, "max_length_tokens": 32}
    with tempfile.TemporaryDirectory(prefix="gpu-check-cog-") as folder:
        checkpoint = make_checkpoint(Path(folder) / "tiny", variant="tiny", seed=0, eos_boost=0.0)
        result = serve_and_predict(checkpoint, Path(folder), inputs, args.seconds, args.events)
    answers = result["requests"]
    ok = len(answers) == len(REQUESTS) and all(a["http_status"] == 200 and a["status"] == "succeeded" for a in answers)
    parts = [f"{a['request']}: HTTP {a['http_status']}, {a['status']}, "
             f"{(a['metrics'] or {}).get('output_token_count', '?')} tokens, TTFT "
             f"{(a['metrics'] or {}).get('time_to_first_token', '?')} s, "
             f"{(a['metrics'] or {}).get('tokens_per_second', '?')} tokens/s, {a['seconds']} s" for a in answers]
    result["summary"] = (f"{'answered' if ok else 'FAILED'} (setup {result.get('setup_status')} in "
                         f"{result.get('setup_seconds')} s, warm-up budget {result['warmup_budget_seconds']:.0f} s) — "
                         + ("; ".join(parts) or "no request answered")
                         + " (tiny random-weight checkpoint, reduced sizes)"
                         + (f"; {result['setup_phases'][-1]}" if result.get("setup_phases") else ""))
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
