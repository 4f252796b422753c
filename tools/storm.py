"""Storm: drive Cog's real server with hundreds of mixed predictions at once and check that
nothing hangs and nothing is lost.

    .venv/bin/python -m tools.storm --n 500                     # tiny random test checkpoint, 8 at once
    .venv/bin/python -m tools.storm --n 200 --weights weights   # a real checkpoint

The mix (seeded): text-only questions, multi-turn conversations (``messages``), 1-4 images of
mixed sizes, grounding prompts, greedy and sampled, plain and streamed (SSE); long answers
cancelled at a chosen moment (as the stream starts, before any text; mid-stream; right after the
end); malformed inputs, each kind with the message it must fail with. ``concurrency`` predictions
are in flight at all times. Every prediction must reach its final state within ``bound``
seconds and be the expected outcome of its kind. A greedy request is answered before and after
the storm and must give the same text; the worker's RSS is taken at prediction ``warmup`` and at
the end. A second server run with 8-bit experts (``DSVL2_QUANTIZE=int8``) follows. Prints one JSON
report per run; exits 1 on any unexpected outcome, a changed greedy answer, an unhealthy server or
RSS growth above ``--rss-bound`` MiB.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import requests
from PIL import Image

from tools.testing.cog_server import CogServer, cog_server, data_uri, read_sse

SIZES = [(64, 48), (320, 200), (200, 480), (640, 480), (1200, 300), (384, 384)]
IMAGE_PROMPTS = ["Describe this picture.", "What colour dominates?", "Compare the images.", "What is written here?"]
GROUNDING_PROMPTS = ["<|grounding|>Find the shapes.", "<|ref|>the white square<|/ref|>."]
TEXT_PROMPTS = ["What is two plus two?", "Write a haiku about rain.", "Name three rivers."]
GREEDY_CHECK = {"prompt": "Describe this picture.", "temperature": 0, "max_length_tokens": 24}
# kind -> substring every failure of that kind must carry (None: HTTP 422 expected)
BAD = {
    "plain_path": "must be sent as a data: URI or an http(s) URL",
    "broken_image": "could not be read as an image",
    "empty_prompt": "prompt must not be empty",
    "tag_mismatch": "<image>",
    "messages_not_json": "messages is not valid JSON",
    "messages_wrong_role": "messages[0].role must be",
    "prompt_too_long": "at most 100000 are accepted",
    "out_of_range": None,
}
CANCEL_MOMENTS = ("before_first_token", "mid_stream", "after_end")
EARLY_CANCEL_SECONDS = 0.15  # coglet 0.23.1 can hang on cancels within ~100 ms of sending (docs/cog.md)


@dataclass
class Outcome:
    kind: str  # text | messages | images | grounding, then :stream; cancel:<moment>; bad:<what>
    ok: bool
    seconds: float
    detail: str = ""


def make_images(folder: Path) -> list[str]:
    """Data URIs of noise-free test images of the SIZES (one colour and a white square each)."""
    uris = []
    for k, (w, h) in enumerate(SIZES):
        image = Image.new("RGB", (w, h), (30 * k % 255, 200 - 25 * k, 90))
        image.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
        path = folder / f"storm{k}.png"
        image.save(path)
        uris.append(data_uri(path))
    return uris


def _final(response: requests.Response, stream: bool) -> tuple[dict, list[str]]:
    """The prediction's final JSON and the streamed chunks (none when not streamed)."""
    if not stream:
        return response.json(), []
    events = list(read_sse(response))
    chunks = [e.data["chunk"] for e in events if e.event == "output"]
    return (events[-1].data if events and events[-1].event == "completed" else {}), chunks


def run_good(server: CogServer, inputs: dict, kind: str, stream: bool, bound: float) -> Outcome:
    """A valid prediction: it must succeed, streamed chunks equal to the final output."""
    started = time.monotonic()
    kind += ":stream" if stream else ""
    with server.send_prediction(inputs, stream=stream, timeout=bound, retry_busy=bound) as response:
        if response.status_code != 200:
            return Outcome(kind, False, 0, f"HTTP {response.status_code}: {response.text[:200]}")
        final, chunks = _final(response, stream)
    ok = final.get("status") == "succeeded" and isinstance(final.get("output"), list)
    ok = ok and (not stream or final["output"] == chunks)
    return Outcome(kind, ok, time.monotonic() - started, "" if ok else str(final)[:300])


def run_cancel(server: CogServer, inputs: dict, moment: str, after_chunks: int, bound: float) -> Outcome:
    """A streamed prediction cancelled at ``moment``: it ends canceled (or succeeded when it was
    already done), and a cancel after the end changes nothing."""
    prediction_id = f"storm-cancel-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    cancelled = False

    def cancel() -> None:
        nonlocal cancelled
        time.sleep(max(0.0, started + EARLY_CANCEL_SECONDS - time.monotonic()))
        requests.post(f"{server.base_url}/predictions/{prediction_id}/cancel", timeout=30)
        cancelled = True

    with server.send_prediction(inputs, prediction_id=prediction_id, stream=True, timeout=bound,
                                retry_busy=bound) as response:
        if response.status_code != 200:
            return Outcome(f"cancel:{moment}", False, 0, f"HTTP {response.status_code}: {response.text[:200]}")
        events, chunks = [], 0
        for event in read_sse(response):
            events.append(event)
            chunks += event.event == "output"
            if not cancelled and ((moment == "before_first_token" and event.event == "start")
                                  or (moment == "mid_stream" and chunks >= after_chunks)):
                cancel()
    if moment == "after_end":
        cancel()
    final = events[-1].data if events and events[-1].event == "completed" else {}
    status = final.get("status")
    expected = ("succeeded",) if moment == "after_end" else ("canceled", "succeeded")
    ok = status in expected
    return Outcome(f"cancel:{moment}", ok, time.monotonic() - started, "" if ok else str(final)[:300])


def run_bad(server: CogServer, inputs: dict, what: str, bound: float) -> Outcome:
    """A malformed prediction: it fails with the message of its kind (or HTTP 422)."""
    started = time.monotonic()
    response = server.send_prediction(inputs, timeout=bound, retry_busy=bound)
    body = response.json()
    expected = BAD[what]
    if expected is None:
        ok = response.status_code == 422
    else:
        ok = response.status_code == 200 and body.get("status") == "failed" and expected in body.get("error", "")
    return Outcome(f"bad:{what}", ok, time.monotonic() - started, "" if ok else str(body)[:300])


def _good_inputs(rng: random.Random, images: list[str]) -> tuple[str, dict[str, Any]]:
    """(kind, inputs) of a valid prediction drawn from the mix."""
    roll = rng.random()
    chosen = [rng.choice(images) for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4]))]
    inputs: dict[str, Any] = dict(zip(["image", "image_2", "image_3", "image_4"], chosen))
    if roll < 0.2:
        kind, inputs = "text", {"prompt": rng.choice(TEXT_PROMPTS)}
    elif roll < 0.4:
        kind, inputs = "messages", ({"image": chosen[0]} if rng.random() < 0.5 else {})
        turns = [{"role": "user", "content": "<image> What is this?" if inputs else "Hello."},
                 {"role": "assistant", "content": "A picture of a square."}]
        inputs.update(messages=json.dumps(turns) if rng.random() < 0.5 else turns, prompt="And its colour?")
    elif roll < 0.55:
        kind, inputs = "grounding", {"image": chosen[0], "prompt": rng.choice(GROUNDING_PROMPTS)}
    else:
        kind = "images"
        inputs["prompt"] = rng.choice(IMAGE_PROMPTS)
    inputs["max_length_tokens"] = rng.randint(1, 24)
    if rng.random() < 0.5:
        inputs.update(temperature=0.7, seed=rng.randint(0, 2**32 - 1), top_k=rng.choice([0, 20]))
    else:
        inputs["temperature"] = 0
    return kind, inputs


def _bad_inputs(rng: random.Random, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    what = rng.choice(list(BAD))
    bad = dict(inputs, image=inputs.get("image") or inputs.get("image_2"), prompt=inputs.get("prompt") or "Hi")
    bad = {k: v for k, v in bad.items() if v is not None and k != "messages"}
    if what == "plain_path":
        bad["image"] = rng.choice(["/etc/passwd", "/etc/hostname", "/no/such/file.png", "demo.png"])
    elif what == "broken_image":
        bad["image"] = "data:image/png;base64,iVBORw0KGgoAAAAAbm90IGFuIGltYWdl"
    elif what == "empty_prompt":
        bad["prompt"] = " \n "
    elif what == "tag_mismatch":
        bad["prompt"] = "<image> " * 5 + "what differs?"
    elif what == "messages_not_json":
        bad["messages"] = "user: hello"
    elif what == "messages_wrong_role":
        bad["messages"] = [{"role": "bot", "content": "Hi"}]
    elif what == "prompt_too_long":
        bad["prompt"] = "word " * 30000
    else:
        bad[rng.choice(["temperature", "top_p", "max_length_tokens"])] = -1
    return what, bad


def next_job(rng: random.Random, images: list[str], bound: float) -> Callable[[CogServer], Outcome]:
    """One prediction of the mix, as a call on a server."""
    roll = rng.random()
    kind, inputs = _good_inputs(rng, images)
    if roll < 0.15:
        inputs.update(max_length_tokens=rng.randint(200, 600), temperature=1.0, repetition_penalty=1.0)
        moment = rng.choice(CANCEL_MOMENTS)
        if moment == "after_end":
            inputs["max_length_tokens"] = rng.randint(1, 8)
        after = rng.randint(1, 12)
        return lambda server: run_cancel(server, inputs, moment, after, bound)
    if roll < 0.30:
        what, bad = _bad_inputs(rng, inputs)
        return lambda server: run_bad(server, bad, what, bound)
    stream = rng.random() < 0.5
    return lambda server: run_good(server, inputs, kind, stream, bound)


def _guarded(job: Callable[[CogServer], Outcome], server: CogServer, bound: float) -> Outcome:
    """The job's outcome; an exception (a timeout past ``bound``: a hang) is an unexpected outcome."""
    started = time.monotonic()
    try:
        return job(server)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return Outcome("error", False, time.monotonic() - started, f"{type(error).__name__}: {error}"[:300])


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _greedy_answer(server: CogServer, image: str, bound: float) -> str:
    response = server.send_prediction(dict(GREEDY_CHECK, image=image), timeout=bound, retry_busy=bound)
    body = response.json()
    if body.get("status") != "succeeded":
        raise RuntimeError(f"the greedy check failed: {str(body)[:300]}")
    return "".join(body["output"])


def storm(server: CogServer, n: int, concurrency: int, seed: int, warmup: int = 100,
          bound: float = 300.0) -> dict[str, Any]:
    """``n`` predictions of the mix, ``concurrency`` in flight, against ``server``; the report.

    RSS is taken after prediction ``warmup`` (the allocator's pools, caches and arenas fill up
    over the first hundred or so predictions of this mix) and at the end."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp))
    greedy_before = _greedy_answer(server, images[0], bound)
    jobs = [next_job(rng, images, bound) for _ in range(n)]
    outcomes: list[Outcome] = []
    rss_at_warmup: Optional[float] = None
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in as_completed([pool.submit(_guarded, job, server, bound) for job in jobs]):
            outcomes.append(future.result())
            if len(outcomes) == min(warmup, n):
                rss_at_warmup = server.worker_rss_mib()
    elapsed = time.monotonic() - started
    rss_end = server.worker_rss_mib()
    greedy_after = _greedy_answer(server, images[0], bound)
    latencies = [o.seconds for o in outcomes if o.ok and not o.kind.startswith(("bad:", "cancel:"))]
    kinds = Counter(o.kind for o in outcomes)
    return {
        "predictions": len(outcomes),
        "concurrency": concurrency,
        "kinds": dict(sorted(kinds.items())),
        "served": sum(o.ok and not o.kind.startswith(("bad:", "cancel:", "error")) for o in outcomes),
        "expected_failures": sum(o.ok and o.kind.startswith("bad:") for o in outcomes),
        "cancelled_or_done": sum(o.ok and o.kind.startswith("cancel:") for o in outcomes),
        "unexpected": [f"{o.kind}: {o.detail}" for o in outcomes if not o.ok],
        "longest_s": round(max((o.seconds for o in outcomes), default=0.0), 2),
        "bound_s": bound,
        "greedy_same_after": greedy_before == greedy_after,
        f"rss_at_{min(warmup, n)}_mib": round(rss_at_warmup or 0.0, 1),
        "rss_end_mib": round(rss_end, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "seconds": round(elapsed, 1),
        "health_after": server.health().get("status"),
    }


def passed(report: dict[str, Any], rss_bound: float) -> bool:
    """Whether a report shows nothing lost: every outcome expected, the greedy answer unchanged,
    the server READY, RSS grown by at most ``rss_bound`` MiB after the warm-up."""
    rss_start = next(v for k, v in report.items() if k.startswith("rss_at_"))
    return (not report["unexpected"] and report["greedy_same_after"] and report["health_after"] == "READY"
            and report["rss_end_mib"] - rss_start <= rss_bound)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: a storm on the default experts, then one on int8 experts; one JSON report each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="predictions of the first run")
    parser.add_argument("--int8-n", type=int, default=100, help="predictions of the int8 run (0: none)")
    parser.add_argument("--weights", help="checkpoint (default: a tiny random test checkpoint)")
    parser.add_argument("--concurrency", type=int, default=8, help="predictions in flight; also the slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=300.0, help="seconds each prediction may take")
    parser.add_argument("--rss-bound", type=float, default=64.0, help="allowed RSS growth after the warm-up, MiB")
    parser.add_argument("--warmup", type=int, default=100, help="the prediction at which RSS is first taken")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from tools.checkpoints import make_checkpoint

            weights = make_checkpoint(Path(tmp) / "ckpt", variant="tiny", seed=7)
        for quantize, n in (("none", args.n), ("int8", args.int8_n)):
            if n <= 0:
                continue
            env = {"COG_MAX_CONCURRENCY": str(args.concurrency), "MALLOC_ARENA_MAX": "2", "DSVL2_QUANTIZE": quantize}
            with cog_server("predict.py:Predictor", weights=weights, env=env) as server:
                report = storm(server, n, args.concurrency, args.seed, min(args.warmup, n // 2), args.bound)
            report["experts"] = quantize
            print(json.dumps(report, indent=2), flush=True)
            ok = ok and passed(report, args.rss_bound)
    print("storm: OK" if ok else "storm: FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
