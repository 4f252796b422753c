"""Count coglet 0.23.1's transient 409s: a request sent the instant the previous answer arrived.

    .venv/bin/python scripts/busy_409_repro.py --rounds 40

Each round sends one prediction, waits for its answer, then at once sends SLOTS predictions
together (no retries) to a SLOTS-slot server, so every slot should be free. Prints how many were
refused with 409. Measured 2026-12-02 on this repo's 2-core CPU VM, 3 slots, 40 rounds: 1 of 120, then 2 of 120.
See docs/cog.md ("Beyond 8 predictions in flight ...").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts.cog_server import cog_server, data_uri  # noqa: E402
from scripts.make_test_checkpoint import make_checkpoint  # noqa: E402


def main() -> None:
    """Run the rounds against Cog's real server on a random tiny checkpoint and print the count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--slots", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="busy409-"))
    checkpoint = make_checkpoint(folder / "ckpt", variant="tiny", seed=5, eos_boost=0.0)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "image.png")
    request = {"image": data_uri(folder / "image.png"), "prompt": "Hi", "temperature": 0,
               "max_length_tokens": 4}
    env = {"COG_MAX_CONCURRENCY": str(args.slots)}
    with cog_server("predict.py:Predictor", weights=checkpoint, env=env) as server:
        refused = 0
        for _ in range(args.rounds):
            server.predict(request, retry_busy=10)
            with ThreadPoolExecutor(args.slots) as pool:
                answers = list(pool.map(lambda r: server.predict(r, retry_busy=0), [request] * args.slots))
            refused += [status for status, _ in answers].count(409)
    print(f"409 answers: {refused} of {args.rounds * args.slots} requests sent with every slot free")


if __name__ == "__main__":
    main()
