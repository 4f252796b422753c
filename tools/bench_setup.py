"""The benchmark's setup-only mode: build (or load) the model, warm the decode step up, print the phases.

``python -m tools.benchmark --variant base --size reduced --layers 30 --modes compiled --setup-only --json``
prints one JSON object::

    {"setup": {"compile_seconds": ..., "compiles": ..., "graphs": ..., "phases": {...}, "total_seconds": ...}}

Phases as in ``Service.start`` (deepseek_vl2/serving/setup_phases.py): ``load`` (random weights
drawn on the device, or ``--checkpoint`` loaded), ``compile``, ``capture``. One mode only (the first
of ``--modes``): ``compiled`` compiles the step's regions (and captures its graphs on CUDA), ``eager``
compiles nothing. ``--setup-slots`` sets the rows buckets warmed (default 1 slot: bucket 1).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any, Callable

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.model.multimodal import DeepseekVL2
from deepseek_vl2.inputs.processor import DeepseekVL2Processor
from deepseek_vl2.serving.setup_phases import SetupPhases

Load = Callable[[argparse.Namespace], tuple[DeepseekVL2, DeepseekVL2Processor, dict[str, Any]]]


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the C++ compiler's runs): on a shared
    machine a steadier measure of compiling than wall time (with ``TORCHINDUCTOR_COMPILE_THREADS=1``
    Inductor compiles in this process, so no long-lived worker escapes the count)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def setup_only(args: argparse.Namespace, load: Load) -> dict[str, Any]:
    """Time setup's phases for ``args.modes[0]``; returns ``{"setup": {...}}`` (lines go to stderr)."""
    phases = SetupPhases(say=lambda line: print(line, file=sys.stderr, flush=True))
    model, processor, figures = load(args)
    phases.done("load")
    generator = Generator(model, processor, args.prefill_chunk, compile=args.modes[0] == "compiled",
                          max_batch=args.setup_slots, max_len=args.max_len)
    started, cpu = time.perf_counter(), cpu_seconds()
    generator.warmup(max_seconds=args.warmup_seconds)
    warmup_cpu = cpu_seconds() - cpu
    summary = generator.engine.warmup_summary
    phases.decode_warmup_done(summary)
    report = phases.report()
    return {"setup": {"compile_seconds": summary["compile_seconds"], "compiles": summary["compiles"],
                      "graphs": summary["graphs"], "graph_memory_mib": summary["graph_memory_mib"],
                      "warmup_seconds": time.perf_counter() - started, "warmup_cpu_seconds": warmup_cpu,
                      "path": summary["path"],
                      "fallback": summary["fallback"], "layers": model.config.language.num_hidden_layers,
                      "mode": args.modes[0], **figures, **report}}
