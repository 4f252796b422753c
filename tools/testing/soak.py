"""Soak test: drive Cog's real server with N mixed predictions and check nothing is lost.

    .venv/bin/python -m tools.testing.soak --n 500                       # tiny random test checkpoint
    .venv/bin/python -m tools.testing.soak --n 200 --weights weights     # a real checkpoint

The mix (seeded): good predictions with 1-4 images of mixed sizes, answer lengths and sampling
settings, half of them streamed (SSE); long ones cancelled at a random point; bad inputs
interleaved (a plain file path, a broken image, an out-of-range number, an empty prompt, image
tags that do not match the images), sent in concurrent bursts of 1 to slots+2 (beyond capacity
the server answers 409, which the client retries). Every answer is classified; anything that is
not the expected outcome of its kind is a failure. Prints predictions served, failures, the
worker's RSS at start (after a warm-up) and end, and latency p50/p99 of the good ones; exits 1
on any unexpected outcome or when RSS grew by more than --rss-bound MiB.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]

from tools.testing.cog_server import CogServer, cog_server, data_uri, read_sse  # noqa: E402

SIZES = [(64, 48), (320, 200), (200, 480), (640, 480), (1200, 300), (384, 384)]
PROMPTS = ["Describe this picture.", "What colour dominates?", "<|grounding|>Find the shapes.",
           "Compare the images.", "What is written here?"]
# kind -> substring every failure of that kind must carry (None: HTTP 422 expected)
BAD = {
    "plain_path": "must be sent as a data: URI or an http(s) URL",
    "broken_image": "could not be read as an image",
    "empty_prompt": "prompt must not be empty",
    "tag_mismatch": "<image>",
    "out_of_range": None,
}


@dataclass
class Outcome:
    kind: str  # good | stream | cancel | bad:<what>
    ok: bool
    seconds: float
    detail: str = ""


def make_images(folder: Path) -> list[str]:
    """Data URIs of noise-free test images of the SIZES (one colour gradient each)."""
    uris = []
    for k, (w, h) in enumerate(SIZES):
        image = Image.new("RGB", (w, h), (30 * k % 255, 200 - 25 * k, 90))
        image.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
        path = folder / f"soak{k}.png"
        image.save(path)
        uris.append(data_uri(path))
    return uris


def _send(server: CogServer, inputs: dict, prediction_id: Optional[str] = None,
          stream: bool = False) -> requests.Response:
    """One prediction request; at capacity (409) retry for up to 120 s, as a client does."""
    return server.send_prediction(inputs, prediction_id=prediction_id, stream=stream, timeout=600, retry_busy=120)


def run_good(server: CogServer, inputs: dict, stream: bool) -> Outcome:
    started = time.monotonic()
    response = _send(server, inputs, stream=stream)
    kind = "stream" if stream else "good"
    if response.status_code != 200:
        return Outcome(kind, False, 0, f"HTTP {response.status_code}: {response.text[:200]}")
    if stream:
        events = list(read_sse(response))
        final = events[-1].data if events and events[-1].event == "completed" else {}
        chunks = [e.data["chunk"] for e in events if e.event == "output"]
        ok = final.get("status") == "succeeded" and final.get("output", chunks) == chunks
        return Outcome(kind, ok, time.monotonic() - started, "" if ok else str(final)[:300])
    body = response.json()
    ok = body.get("status") == "succeeded" and isinstance(body.get("output"), list)
    return Outcome(kind, ok, time.monotonic() - started, "" if ok else str(body)[:300])


def run_cancel(server: CogServer, inputs: dict, delay: float) -> Outcome:
    prediction_id = f"soak-cancel-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_send, server, inputs, prediction_id)
        time.sleep(delay)
        while requests.post(f"{server.base_url}/predictions/{prediction_id}/cancel", timeout=30).status_code == 404:
            if pending.done():
                break
            time.sleep(0.01)
        response = pending.result(timeout=600)
    body = response.json()
    status = body.get("status")
    # A cancel landing while Cog still prepares inputs is reported as failed "Input validation
    # error" by coglet 0.23.1 (docs/cog.md); a short answer may finish before the cancel.
    ok = status in ("canceled", "succeeded") or (
        status == "failed" and str(body.get("error", "")).startswith("Input validation error"))
    return Outcome("cancel", ok, time.monotonic() - started, "" if ok else str(body)[:300])


def run_bad(server: CogServer, inputs: dict, what: str) -> Outcome:
    started = time.monotonic()
    response = _send(server, inputs)
    body = response.json()
    expected = BAD[what]
    if expected is None:
        ok = response.status_code == 422
    else:
        ok = response.status_code == 200 and body.get("status") == "failed" and expected in body.get("error", "")
    return Outcome(f"bad:{what}", ok, time.monotonic() - started, "" if ok else str(body)[:300])


def next_job(rng: random.Random, images: list[str]):
    """One job: (function, arguments) drawn from the mix."""
    roll = rng.random()
    n_images = rng.choice([1, 1, 1, 2, 2, 3, 4])
    chosen = [rng.choice(images) for _ in range(n_images)]
    inputs: dict[str, Any] = {"image": chosen[0], "prompt": rng.choice(PROMPTS),
                              "max_length_tokens": rng.randint(1, 24)}
    for name, uri in zip(["image_2", "image_3", "image_4"], chosen[1:]):
        inputs[name] = uri
    if rng.random() < 0.5:
        inputs.update(temperature=0.7, seed=rng.randint(0, 2**32 - 1), top_k=rng.choice([0, 20]))
    else:
        inputs["temperature"] = 0
    if roll < 0.15:
        inputs.update(max_length_tokens=rng.randint(200, 600), temperature=1.0, repetition_penalty=1.0)
        return run_cancel, (inputs, rng.uniform(0.05, 1.5))
    if roll < 0.30:
        what = rng.choice(list(BAD))
        bad = dict(inputs)
        if what == "plain_path":
            bad["image"] = rng.choice(["/etc/passwd", "/etc/hostname", "/no/such/file.png", "demo.png"])
        elif what == "broken_image":
            bad["image"] = "data:image/png;base64,iVBORw0KGgoAAAAAbm90IGFuIGltYWdl"
        elif what == "empty_prompt":
            bad["prompt"] = " \n "
        elif what == "tag_mismatch":
            bad["prompt"] = "<image> " * (n_images + 1) + "what differs?"
        else:
            bad[rng.choice(["temperature", "top_p", "max_length_tokens"])] = -1
        return run_bad, (bad, what)
    return run_good, (inputs, rng.random() < 0.5)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _run_mix(server: CogServer, pool: ThreadPoolExecutor, rng: random.Random, images: list[str],
             n: int, slots: int, trace: Optional[list[int]] = None) -> list[Outcome]:
    """``n`` jobs of the mix in concurrent bursts; RSS appended to ``trace`` every n/10."""
    outcomes: list[Outcome] = []
    while len(outcomes) < n:
        burst = min(rng.randint(1, slots + 2), n - len(outcomes))
        jobs = [next_job(rng, images) for _ in range(burst)]
        futures = [pool.submit(job, server, *args) for job, args in jobs]
        outcomes += [f.result(timeout=900) for f in futures]
        if trace is not None and len(outcomes) * 10 // n >= len(trace):
            trace.append(round(server.worker_rss_mib()))
    return outcomes


def soak(server: CogServer, n: int, slots: int, seed: int, warmup: int = 100) -> dict[str, Any]:
    """Run ``warmup`` then ``n`` predictions of the mix against ``server``; the report.

    RSS is taken after the warm-up (the allocator's pools, caches and per-thread arenas fill up
    over the first hundred or so predictions of this mix) and every n/10 predictions after.
    """
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp))
    with ThreadPoolExecutor(max_workers=slots + 2) as pool:
        warm = _run_mix(server, pool, rng, images, warmup, slots)
        rss_start = server.worker_rss_mib()
        trace = [round(rss_start)]
        started = time.monotonic()
        outcomes = _run_mix(server, pool, rng, images, n, slots, trace)
        elapsed = time.monotonic() - started
    rss_end = server.worker_rss_mib()
    health = server.health().get("status")
    latencies = [o.seconds for o in outcomes if o.ok and o.kind in ("good", "stream")]
    failures = [f"{o.kind}: {o.detail}" for o in warm + outcomes if not o.ok]
    return {
        "predictions": len(outcomes),
        "warmup_predictions": len(warm),
        "served": sum(o.ok and o.kind in ("good", "stream") for o in outcomes),
        "kinds": dict(Counter(o.kind for o in outcomes)),
        "expected_failures": sum(o.ok and o.kind.startswith("bad:") for o in outcomes),
        "cancelled": sum(o.ok and o.kind == "cancel" for o in outcomes),
        "unexpected": failures,
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_trace_mib": trace,
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "seconds": round(elapsed, 1),
        "health_after": health,
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: start the server, soak it, print the report (JSON); status 1 on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="predictions (after the warm-up)")
    parser.add_argument("--weights", help="checkpoint (default: a tiny random test checkpoint)")
    parser.add_argument("--slots", type=int, default=8, help="COG_MAX_CONCURRENCY")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-bound", type=float, default=64.0, help="allowed RSS growth, MiB")
    parser.add_argument("--warmup", type=int, default=100, help="predictions before RSS is taken")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from tools.checkpoints import make_checkpoint

            weights = make_checkpoint(Path(tmp) / "ckpt", variant="tiny", seed=7)
        with cog_server("predict.py:Predictor", weights=weights,
                        env={"COG_MAX_CONCURRENCY": str(args.slots), "MALLOC_ARENA_MAX": "2"}) as server:
            report = soak(server, args.n, args.slots, args.seed, args.warmup)
    grown = report["rss_end_mib"] - report["rss_start_mib"]
    report["rss_bound_mib"] = args.rss_bound
    print(json.dumps(report, indent=2))
    ok = not report["unexpected"] and grown <= args.rss_bound and report["health_after"] == "READY"
    print("soak: OK" if ok else "soak: FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
