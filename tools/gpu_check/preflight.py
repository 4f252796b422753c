"""GPU check, stage ``preflight`` (seconds): which decode path can this machine run?

Checks the toolchain Inductor needs (a C compiler, the Python headers, Triton on CUDA), then
tries a toy step that has what the decode step has (matmuls, a stable sort over a wide row, a
cumulative sum, an argmax) on each rung, slowest first, so that a rung that hangs past the
stage's limit still leaves the rung below it proven. The rungs are the product's two decode
paths (docs/engine.md):

1. ``eager`` — the plain step (the one fallback);
2. ``compiled+graphs`` (CUDA; ``compiled`` on the CPU) — ``torch.compile(fullgraph=True)``,
   captured and replayed.

Each rung's result (ok, seconds, the error) is one JSON line in OUT as soon as it is known, and
the last line names the fastest rung that worked and why the faster ones did not. The check's
other stages read it (``rung_from_lines``) and run that rung: the benchmark's modes and the
Cog server's DSVL2_COMPILE.

    python -m tools.gpu_check.preflight OUT.jsonl [--device cuda]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

RUNGS = {"cuda": ("eager", "compiled+graphs"), "cpu": ("eager", "compiled")}
BENCHMARK_MODES = {"compiled+graphs": "eager,compiled", "compiled": "eager,compiled", "eager": "eager"}


def toolchain() -> dict[str, Any]:
    """What Inductor needs to compile: a C compiler, Python.h, and Triton (for CUDA kernels)."""
    compiler = next((shutil.which(c) for c in (os.environ.get("CC", ""), "gcc", "cc", "clang") if c and shutil.which(c)),
                    None)
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    triton = importlib.util.find_spec("triton")
    version = None
    if triton is not None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("triton")
        except PackageNotFoundError:
            version = "?"
    return {"c_compiler": compiler, "python_headers": str(headers) if headers.is_file() else None,
            "triton": version}


def toy_step(x, weight):
    """A few ops of the decode step: matmul, a stable descending sort over a wide row, cumsum, argmax."""
    import torch

    logits = torch.relu(x @ weight) @ weight.t()
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    kept = torch.softmax(ordered, dim=-1).cumsum(-1) <= 0.9
    return order.gather(-1, kept.long().argmax(-1, keepdim=True)), ordered[:, :1]


def try_rung(rung: str, device: str) -> None:
    """Run the toy on ``rung``; raises when it does not work or disagrees with eager."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=generator).to(device)
    weight = torch.randn(64, 4096, generator=generator).to(device) / 8
    expected = toy_step(x, weight)
    step: Callable = torch.compile(toy_step, fullgraph=True) if rung.startswith("compiled") else toy_step
    outputs = step(x, weight)
    if rung.endswith("graphs"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(x, weight)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = step(x, weight)
        graph.replay()
        torch.cuda.synchronize()
    for got, want in zip(outputs, expected):
        if not torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3):
            raise AssertionError(f"{rung}: the toy step's result differs from eager")


def rung_from_lines(lines: list[dict[str, Any]], device: str) -> tuple[str, str]:
    """(fastest rung that worked, why not the faster ones) from the preflight's JSON lines; a
    preflight that said nothing gives ``eager``."""
    worked = [line["rung"] for line in lines if line.get("event") == "rung" and line.get("ok")]
    failed = {line["rung"]: line.get("error", "?") for line in lines if line.get("event") == "rung" and not line.get("ok")}
    best = next((rung for rung in reversed(RUNGS[device]) if rung in worked), "eager")
    fastest = RUNGS[device][-1]
    tools = next((line for line in lines if line.get("event") == "toolchain"), {})
    complete = tools.get("c_compiler") and tools.get("python_headers") and (device == "cpu" or tools.get("triton"))
    if best != fastest and fastest not in failed and best in worked and complete:
        # The toy's compile outlasted the stage, nothing failed, the toolchain is all there: try it
        # (the benchmark drops a mode that fails, with a mode_failed line, and goes on).
        return fastest, f"{fastest}: not proven within the time limit, toolchain complete (tried anyway)"
    faster = RUNGS[device][RUNGS[device].index(best) + 1:]
    reasons = [f"{rung}: {failed.get(rung, 'not reached within the time limit')}" for rung in faster]
    return best, "; ".join(reasons) or "the fastest rung works"


def main(argv: Optional[list[str]] = None) -> int:
    """Write the toolchain line, one line per rung, then the choice; exit 0 (a choice is always made)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def emit(event: str, **fields: Any) -> None:
        line = {"stage": "preflight", "event": event, "seconds": round(time.perf_counter() - started, 2), **fields}
        with open(args.out, "a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
        print(json.dumps(line, default=str), flush=True)

    tools = toolchain()
    import torch

    emit("toolchain", torch=torch.__version__, cuda_available=torch.cuda.is_available(), **tools)
    lines = []
    for rung in RUNGS[args.device]:
        t0 = time.perf_counter()
        try:
            if rung.startswith("compiled") and not (tools["c_compiler"] and tools["python_headers"]):
                raise RuntimeError(f"no C compiler ({tools['c_compiler']}) or Python.h ({tools['python_headers']})")
            if rung.startswith("compiled") and args.device == "cuda" and not tools["triton"]:
                raise RuntimeError("Triton is not installed")
            try_rung(rung, args.device)
            line = {"event": "rung", "rung": rung, "ok": True, "rung_seconds": round(time.perf_counter() - t0, 2)}
        except Exception as error:  # noqa: BLE001 - a rung that fails is the finding
            line = {"event": "rung", "rung": rung, "ok": False, "rung_seconds": round(time.perf_counter() - t0, 2),
                    "error": f"{type(error).__name__}: {error}"[:1500],
                    "where": traceback.format_exc(limit=-2)[-600:]}
        lines.append(line)
        emit(**line)
    rung, why = rung_from_lines(lines, args.device)
    emit("choice", rung=rung, benchmark_modes=BENCHMARK_MODES[rung], compile=rung.startswith("compiled"), why=why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
