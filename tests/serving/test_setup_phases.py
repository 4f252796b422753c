"""Setup's clock (deepseek_vl2/serving/setup_phases.py): each phase from the end of the one before,
the decode warm-up split into compile and capture, and the total."""
from __future__ import annotations

from deepseek_vl2.serving import setup_phases
from deepseek_vl2.serving.setup_phases import SetupPhases


def test_phases_follow_each_other_and_the_warm_up_splits_into_compile_and_capture(monkeypatch) -> None:
    clock = iter([100.0, 102.0, 112.0, 113.5, 120.0])  # start, loaded, warmed up, warm-up request, report
    monkeypatch.setattr(setup_phases.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    phases = SetupPhases(say=lines.append)
    phases.done("load")
    phases.decode_warmup_done({"compiles": 5, "graphs": 32, "graph_seconds": 4.0, "graph_memory_mib": 12.0,
                               "path": "compiled + CUDA graphs", "fallback": None})
    phases.done("warm-up request")
    report = phases.report()
    assert report == {"phases": {"load": 2.0, "compile": 6.0, "capture": 4.0, "warm-up request": 1.5},
                      "total_seconds": 20.0}
    assert lines[1] == "setup phase compile: 6.0 s; 5 compile(s), decode path compiled + CUDA graphs"
    assert lines[2] == "setup phase capture: 4.0 s; 32 CUDA graph(s), pool 12 MiB"
    assert lines[-1].startswith("setup total: 20.0 s (load 2.0 s, compile 6.0 s")


def test_a_fallback_is_named_in_the_compile_line() -> None:
    lines: list[str] = []
    SetupPhases(say=lines.append).decode_warmup_done({"compiles": 1, "graphs": 0, "graph_seconds": 0.0,
                                                      "path": "eager", "fallback": "RuntimeError: no compiler"})
    assert "decode path eager; fell back to the eager step: RuntimeError: no compiler" in lines[0]
