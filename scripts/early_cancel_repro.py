"""Reproduce coglet 0.23.1's hang on cancels that land while it prepares a prediction's inputs.

    .venv/bin/python scripts/early_cancel_repro.py --n 100                 # streaming bridge on
    .venv/bin/python scripts/early_cancel_repro.py --n 100 --mode collect  # bridge off: hangs too

Each of N predictions (a data: URI image, up to 4 at once on an 8-slot server) is cancelled
0-150 ms after it was sent. Prints the outcomes; "HUNG" ones never ended. Measured 2026-12-02 on
this repo's CPU machine: in most runs of 100 some predictions hang and every later one with them
(py-spy: one coglet slot thread waits forever in Thread.start inside the input-download
ThreadPoolExecutor, holding concurrent.futures' global lock; all other slots wait for that lock),
in both modes. See docs/cog.md, "Known issue".
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts.cog_server import CogServer, cog_server, data_uri  # noqa: E402


def cancel_early(server: CogServer, image: str, k: int, rng: random.Random) -> str:
    """Send one prediction, cancel it within 150 ms; its outcome (status / error / HUNG)."""
    prediction_id = f"early-{k}-{uuid.uuid4().hex[:6]}"
    url = f"{server.base_url}/predictions/{prediction_id}"
    inputs = {"image": image, "prompt": "Go on.", "max_length_tokens": 300, "temperature": 1.0}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(requests.put, url, json={"input": inputs}, timeout=60)
        time.sleep(rng.uniform(0, 0.15))
        while requests.post(f"{url}/cancel", timeout=30).status_code == 404 and not pending.done():
            time.sleep(0.002)
        try:
            body = pending.result(timeout=90).json()
        except Exception as error:  # noqa: BLE001 - a hang is the finding
            return f"HUNG ({type(error).__name__})"
    return body.get("status", "?") + (f": {body['error'][:50]}" if body.get("error") else "")


def main() -> int:
    """Start a server on a tiny random checkpoint and cancel N predictions early."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--mode", choices=["auto", "collect"], default="auto")
    args = parser.parse_args()
    from scripts.make_test_checkpoint import make_checkpoint

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "ckpt", variant="tiny", seed=7)
        env = {"COG_MAX_CONCURRENCY": "8", "DSVL2_STREAMING": args.mode}
        with cog_server("predict.py:Predictor", weights=checkpoint, env=env) as server:
            image = data_uri(REPO_ROOT / "demo.png")
            with ThreadPoolExecutor(max_workers=4) as pool:
                outcomes = list(pool.map(lambda k: cancel_early(server, image, k, rng), range(args.n)))
    counts = Counter(o if not o.startswith("HUNG") else "HUNG" for o in outcomes)
    for outcome, count in counts.most_common():
        print(f"{count:4d}  {outcome}")
    return 1 if counts.get("HUNG") else 0


if __name__ == "__main__":
    sys.exit(main())
