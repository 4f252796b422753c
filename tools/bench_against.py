"""Decode speed of this tree against another checkout of the project, in alternating processes.

``python -m tools.bench_against --other DIR [--other-module scripts.benchmark] [--rounds N] -- BENCHMARK ARGS``
runs ``python -m tools.benchmark BENCHMARK ARGS --json`` here and ``python -m OTHER_MODULE BENCHMARK ARGS
--json`` in ``DIR`` (its own code on the path), ``--rounds`` times each, alternating which goes
first, with the same interpreter. It prints one JSON line per process (decode tokens/s of each
timed run per mode, warm-up seconds, the load average before it) and a summary line: the median
decode tokens/s of each (code, mode) over every run and the ratio this ÷ other per mode. On a shared
machine alternating processes is what makes the ratio fair; read it, not the absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parents[1]


def run_benchmark(root: Path, module: str, args: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One benchmark process in ``root``: its JSON report and its ``warmup`` events (the decode path
    each compiled mode ended on); raises with its stderr tail on failure."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as scratch:
        events = Path(scratch) / "events.jsonl"
        done = subprocess.run([sys.executable, "-m", module, *args, "--json", "--jsonl", str(events)], cwd=root,
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{module} in {root} exited {done.returncode}: {done.stderr[-2000:]}")
        lines = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    warmups = [{key: line.get(key) for key in ("mode", "warmup_seconds", "path", "fallback", "compiles")}
               for line in lines if line.get("event") == "warmup"]
    return json.loads(done.stdout[done.stdout.index("{"):]), warmups


def decode_rates(report: dict[str, Any]) -> dict[str, list[float]]:
    """Decode tokens/s of each timed run, per mode."""
    return {mode: [run["decode_tokens_per_second"] for run in runs] for mode, runs in report["runs"].items()}


def compare(other: Path, other_module: str, rounds: int, args: list[str]) -> dict[str, Any]:
    """Alternate the two codes ``rounds`` times; print a line per process and return the summary."""
    codes = {"this": (HERE, "tools.benchmark"), "other": (other, other_module)}
    rates: dict[str, dict[str, list[float]]] = {"this": {}, "other": {}}
    for round_ in range(rounds):
        for code in (("other", "this") if round_ % 2 == 0 else ("this", "other")):
            load = os.getloadavg()[0]
            started = time.time()
            report, warmups = run_benchmark(*codes[code], args)
            for mode, values in decode_rates(report).items():
                rates[code].setdefault(mode, []).extend(values)
            print(json.dumps({"round": round_ + 1, "code": code, "load_average_1min": round(load, 2),
                              "wall_seconds": round(time.time() - started, 1),
                              "warmups": warmups,
                              "decode_tokens_per_second": decode_rates(report)}), flush=True)
    medians = {code: {mode: statistics.median(v) for mode, v in by_mode.items()} for code, by_mode in rates.items()}
    ratios = {mode: medians["this"][mode] / medians["other"][mode]
              for mode in medians["this"] if medians["other"].get(mode)}
    return {"median_decode_tokens_per_second": medians, "this_over_other": ratios,
            "load_average_1min_end": round(os.getloadavg()[0], 2)}


def main(argv: Optional[list[str]] = None) -> int:
    """Parse the driver's arguments (benchmark arguments after ``--``), run, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="root of the other checkout")
    parser.add_argument("--other-module", default="tools.benchmark", help="its benchmark module")
    parser.add_argument("--rounds", type=int, default=2, help="processes per code, alternating (default 2)")
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="-- then the benchmark's arguments")
    args = parser.parse_args(argv)
    bench_args = args.benchmark_args[1:] if args.benchmark_args[:1] == ["--"] else args.benchmark_args
    print(json.dumps({"summary": compare(args.other.resolve(), args.other_module, args.rounds, bench_args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
