"""Setup's clock: one printed line per phase of ``Service.start`` and the total.

Phases: find/download, load (8-bit experts are quantized as each tensor is read, so quantizing is
inside it and named with it), compile and capture (from the decode engine's warm-up summary: the
compile count, the CUDA graph count and their memory pool), the warm-up request, and the total.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Mapping


class SetupPhases:
    """Seconds per setup phase, each measured from the end of the one before."""

    def __init__(self, say: Callable[[str], None] = lambda line: print(line, file=sys.stdout, flush=True)) -> None:
        self.started = self.mark = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.say = say  # where the lines go (stdout: Cog's setup log)

    def elapsed(self) -> float:
        """Seconds since setup started."""
        return time.perf_counter() - self.started

    def done(self, name: str, detail: str = "") -> float:
        """Close the phase that ran since the last mark; prints and returns its seconds."""
        now = time.perf_counter()
        seconds, self.mark = now - self.mark, now
        return self._record(name, seconds, detail)

    def decode_warmup_done(self, summary: Mapping[str, object]) -> None:
        """Close the decode warm-up as two phases, compile and capture, from ``DecodeEngine.warmup_summary``."""
        now = time.perf_counter()
        total, self.mark = now - self.mark, now
        capture = float(summary.get("graph_seconds", 0.0))
        fallback = f"; fell back to the eager step: {summary['fallback']}" if summary.get("fallback") else ""
        self._record("compile", total - capture,
                     f"{summary.get('compiles', 0)} compile(s), decode path {summary.get('path')}{fallback}")
        self._record("capture", capture, f"{summary.get('graphs', 0)} CUDA graph(s), pool "
                                         f"{float(summary.get('graph_memory_mib', 0.0)):.0f} MiB")

    def _record(self, name: str, seconds: float, detail: str) -> float:
        self.phases[name] = seconds
        self.say(f"setup phase {name}: {seconds:.1f} s{'; ' + detail if detail else ''}")
        return seconds

    def report(self) -> dict[str, object]:
        """Print the total; returns {"phases": {name: seconds}, "total_seconds": seconds}."""
        total = self.elapsed()
        self.say(f"setup total: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + ")")
        return {"phases": dict(self.phases), "total_seconds": total}
