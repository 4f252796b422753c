"""The GPU check: two prepared device calls of at most 8 minutes each, or its CPU dry run.

Stages, each a subprocess with its own time limit (printed before it starts), run one after the
other whatever the previous one did:

* ``preflight`` (tools/gpu_check/preflight.py): the toolchain and a toy step on each rung; picks the
  faster that works — compiled + CUDA graphs, else eager — for the stages below, saying why;
* ``parity``: the reference-parity tests (tests/parity/test_reference.py, model sections) with
  ``DSVL2_TEST_DEVICE=cuda`` — the only stage that needs pytest (skipped, saying so, without it)
  — plus ``tools/parity/measure_drift.py --formats bf16 --device cuda`` for the bf16 figures;
* ``speed:VARIANT``: ``tools/benchmark.py`` on random weights of the real shapes, eager beside
  the preflight's rung, that variant's target rows, one sampled request (temperature 0.7, top_p 0.9),
  and a setup row (random build, compile count and seconds, CUDA graphs and their pool);
* ``official:VARIANT`` (when ``DSVL2_OFFICIAL`` points to the official package): the official
  code's figures on the same device;
* ``cog`` (tools/gpu_check/cog_stage.py): Cog's HTTP server on the device, its own warm-up budget,
  one greedy and one sampled request.

``--call 1`` runs preflight, parity, speed:tiny, speed:small and official:small; ``--call 2``
preflight, speed:base and cog; no ``--call`` runs everything (the dry run). Every stage appends
JSON lines to ``OUTDIR/events.jsonl`` as it measures (a stage ended at its limit keeps what it
had); after each stage ``OUTDIR/gpu_check.json`` (everything), ``gpu_check.md`` (the table) and
``logs.tar.gz`` (every stage's log) are rewritten. Four files in all: a device call brings back
at most eight.

    tools/gpu_check/gpu_check.sh OUTDIR [--call 1|2] [--dry-run]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
from tools.parity.reference_data import reference_available  # noqa: E402  (the parity tests' own "fixtures present" rule)
from tools.gpu_check.report import markdown  # noqa: E402
from tools.gpu_check.preflight import BENCHMARK_MODES, rung_from_lines  # noqa: E402

# ../shared beside the checkout; on a GPU machine an ignored copy carried as .shared/
SHARED = Path(os.environ.get("DSVL2_SHARED_DIR") or (REPO_ROOT.parent / "shared" if (REPO_ROOT.parent / "shared").is_dir()
                                                     else REPO_ROOT / ".shared"))
VARIANT_ROWS = {"tiny": "decode,ttft,concurrency,prefix", "small": "decode,e2e_1428,memory", "base": "decode,ttft,e2e_demo,memory"}
OFFICIAL_WORKLOADS = {"tiny": "1", "small": "1,2", "base": "1,3"}
CALLS = {"1": ["preflight", "parity", "speed:tiny", "speed:small", "official:small"],
         "2": ["preflight", "speed:base", "cog"],
         "all": ["preflight", "parity", "speed:tiny", "speed:small", "speed:base", "official:small", "cog"]}
CALL_SECONDS = 470  # each device call is sent with a 480 s limit: the stages end 10 s before it

# Stage limits on the GPU = 1.25 × (work without compiling + the stage's compiles), printed at the
# start. The decode step compiles region by region (docs/engine.md), independent of depth: per rows
# bucket one inputs region, one per layer kind (dense, MoE) and one outputs region per mode = 5.
# Stages: tiny warms 8 slots (rows 1, 2, 4, 8: 20 regions, 8 of them layers); small, base and cog
# 1 slot (5 regions, 2 of them layers).
COMPILES = {"speed:tiny": (20, 8), "speed:small": (5, 2), "speed:base": (5, 2), "cog": (5, 2)}  # (regions, layer regions)
# Seconds of a compile from the rehearsal (tools/gpu_check/rehearse_env.sh --compiles: torch 2.11, this
# 2-core CPU, reduced widths, wall time × the CPU share the process got): a compiled function costs
# 2.7 s + 0.94 s per decoder layer in it, a process's first compile 45 s more (Inductor's start-up
# and cold code generation); a region holds at most one layer.
FIRST_COMPILE_EXTRA, COMPILE_BASE, COMPILE_PER_LAYER = 45.0, 2.7, 0.94
# Work that is not compiling, estimated for an H100 (model build at a few GB/s of random draws,
# eager requests at ~30 tokens/s, graph captures at ~0.2 s each): base's eager 500-token demo
# request alone is ~20 s.
WORK_SECONDS = {"preflight": 20, "parity": 40, "bf16_drift": 20, "speed:tiny": 30, "speed:small": 40,
                "speed:base": 80, "official:small": 60, "cog": 35}
SAFETY = 1.25


def compile_seconds(stage: str) -> float:
    """Seconds the stage's compiles cost (0 without compiles, or on an eager rung)."""
    regions, layer_regions = COMPILES.get(stage, (0, 0))
    return FIRST_COMPILE_EXTRA + regions * COMPILE_BASE + layer_regions * COMPILE_PER_LAYER if regions else 0.0


def stage_limits(rung_compiles: bool = True) -> dict[str, int]:
    """Each stage's limit in seconds (see the constants above); the preflight's is fixed."""
    return {stage: work if stage == "preflight" else
            math.ceil(SAFETY * (work + (compile_seconds(stage) if rung_compiles else 0)))
            for stage, work in WORK_SECONDS.items()}


class Check:
    """One run of the check: its arguments, output folder, work folder, report and clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out_dir
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.events = self.out / "events.jsonl"
        self.started = time.monotonic()
        self.report: dict[str, Any] = {}
        self.rung = "eager"

    def emit(self, stage: str, event: str, **fields: Any) -> None:
        """Append one line to events.jsonl now, and print it."""
        line = json.dumps({"stage": stage, "event": event, "time": round(time.time(), 2), **fields}, default=str)
        with open(self.events, "a") as handle:
            handle.write(line + "\n")
        print(line, flush=True)

    def lines(self, **match: Any) -> list[dict[str, Any]]:
        """The lines of events.jsonl whose fields equal ``match``."""
        if not self.events.is_file():
            return []
        found = []
        for text in self.events.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if all(line.get(k) == v for k, v in match.items()):
                    found.append(line)
        return found

    def limit(self, stage: str) -> float:
        """The stage's limit, shortened so that the whole call ends within --call-seconds."""
        left = self.args.call_seconds - (time.monotonic() - self.started) - 5
        return max(1.0, min(self.args.limits[stage], left))

    def run(self, stage: str, command: list[str], env: Optional[dict[str, str]] = None,
            limit: Optional[float] = None) -> dict[str, Any]:
        """Run one command in its own process group with a time limit; its output goes to a log."""
        limit = self.limit(stage) if limit is None else limit
        log = self.work / f"{stage.replace(':', '_')}.log"
        self.emit(stage, "start", limit_seconds=round(limit), command=" ".join(command))
        start = time.perf_counter()
        with open(log, "w") as handle:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                code: Optional[int] = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
                stop_group(process)
        result = {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
                  "limit_seconds": round(limit), "exit_code": code, "timed_out": code is None, "log": log.name}
        self.emit(stage, "end", **{k: v for k, v in result.items() if k != "command"})
        return result

    def save(self) -> None:
        """Rewrite gpu_check.json, gpu_check.md and logs.tar.gz from what is known now."""
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.report))
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                tar.add(path, arcname=f"logs/{path.name}")


def stop_group(process: subprocess.Popen, grace: float = 10) -> None:
    """End a process started with ``start_new_session=True`` and everything it started: SIGTERM,
    then SIGKILL if it is still there ``grace`` seconds later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            return


# ----------------------------------------------------------------------------- stages
def preflight_stage(check: Check, _: str) -> dict[str, Any]:
    """The toolchain and the toy step on each rung; sets ``check.rung``."""
    command = [sys.executable, "-m", "tools.gpu_check.preflight", str(check.events), "--device", check.args.device]
    result = check.run("preflight", command)
    check.rung, why = rung_from_lines(check.lines(stage="preflight"), check.args.device)
    result.update(rung=check.rung, why=why, benchmark_modes=BENCHMARK_MODES[check.rung],
                  toolchain=next(iter(check.lines(stage="preflight", event="toolchain")), None))
    return result


def parity_stage(check: Check, _: str) -> dict[str, Any]:
    """Reference-parity tests on the device (when pytest and the fixtures are here), and the bf16
    drift figures (when the fixtures are here)."""
    env = {"DSVL2_TEST_DEVICE": check.args.device, **reference_env()}
    root = Path(env["DSVL2_REFERENCE_DIR"])
    if not reference_available(root):
        return {"skipped": f"no reference fixtures at {root} (set DSVL2_REFERENCE_DIR, or carry .whl/shared: "
                           "docs/benchmark.md)"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        result: dict[str, Any] = {"skipped": "pytest is not installed here (carry its wheels: docs/benchmark.md)"}
    else:
        select = "not processor" + (" and tiny and (small_200x150 or text_only)" if check.args.dry_run else "")
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/parity/test_reference.py",
                   "-k", select]
        result = check.run("parity", command, env)
        result.update(outcome_counts(check.work / result["log"]))
        check.emit("parity", "counts", **{k: result[k] for k in ("passed", "failed", "skipped", "failures")})
    drift_json = check.work / "bf16_drift.json"
    drift = [sys.executable, "-m", "tools.parity.measure_drift", "--formats", "bf16", "--device", check.args.device,
             "--json", str(drift_json)]
    if check.args.dry_run:
        drift += ["--configs", "tiny", "--cases", "small_200x150"]
    result["bf16_drift"] = check.run("bf16_drift", drift, reference_env())
    with contextlib.suppress(OSError, ValueError, KeyError):
        result["bf16_drift"]["summary"] = json.loads(drift_json.read_text())["summary"]["bf16"]
        check.emit("bf16_drift", "summary", **result["bf16_drift"]["summary"])
    return result


def reference_env() -> dict[str, str]:
    """DSVL2_REFERENCE_DIR as given, else the fixtures under SHARED."""
    return {"DSVL2_REFERENCE_DIR": os.environ.get("DSVL2_REFERENCE_DIR") or str(SHARED / "fixtures" / "reference")}


OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def outcome_counts(log: Path) -> dict[str, Any]:
    """passed / failed / skipped counts and the failing tests from a ``pytest -v`` log, as far as
    it got (each test's line is written when it ends: a run cut at its limit keeps its counts)."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    text = log.read_text(errors="replace") if log.is_file() else ""
    for name, outcome in OUTCOME.findall("\n".join(line.strip() for line in text.splitlines())):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed"}.get(outcome, "skipped")
        counts[key] += 1
        if key == "failed":
            counts["failures"].append(name)
    for match in re.finditer(r"^(?:FAILED|ERROR) (\S+) - (.*)$", text, re.MULTILINE):  # the short summary's reasons
        counts["failures"] = [f"{f}: {match.group(2)[:300]}" if f == match.group(1) else f for f in counts["failures"]]
    if not text.strip():
        counts["failures"].append("no pytest output (the run did not start)")
    return counts


def speed_stage(check: Check, stage: str) -> dict[str, Any]:
    """benchmark.py for one variant: eager beside the preflight's rung, the variant's target rows."""
    variant = stage.split(":")[1]
    json_path = check.work / f"speed_{variant}.json"
    modes = BENCHMARK_MODES[check.rung]
    command = [sys.executable, "-m", "tools.benchmark", "--variant", variant, "--device", check.args.device,
               "--target-rows", "--rows", VARIANT_ROWS[variant], "--json", "--jsonl", str(check.events),
               "--modes", modes if variant == "tiny" or not check.args.dry_run else "eager"]
    if check.args.dry_run:  # compiling costs a minute on 2 CPU cores: the compiled path runs for tiny only
        command += ["--size", "reduced", "--dtype", "float32", "--new-tokens", "8", "--repeats", "1",
                    "--row-new-tokens-scale", "0.03", "--concurrency", "2", "--max-len", "1792", "--threads", "2"]
    else:  # the warm-up compiles (and captures) both step modes: the sampled request compiles nothing
        command += ["--dtype", "bfloat16", "--new-tokens", "64", "--repeats", "2"]
        command += ["--max-len", "1024"] if variant == "tiny" else []  # its rows fit: 4 KV buckets to capture
    wrapped = ["bash", "-c", f'exec {" ".join(command)} > "{json_path}"']
    result = check.run(stage, wrapped, {"TORCHINDUCTOR_COMPILE_THREADS": "1"} if check.args.dry_run else None)
    with contextlib.suppress(OSError, ValueError):  # a run that printed its JSON but lingered past the limit counts
        result["benchmark"] = json.loads(json_path.read_text())
    lines = check.lines(source="benchmark", variant=variant)
    result["rows"] = [line for line in lines if line["event"] == "row"]
    result["sampled"] = {line["mode"]: line for line in lines if line["event"] == "sampled"}
    result["memory"] = next((line for line in lines if line["event"] == "memory"), None)  # estimate vs max allocated
    result["mode_failed"] = [line for line in lines if line["event"] == "mode_failed"]
    result["setup"] = setup_row(lines)
    result["complete"] = any(line["event"] == "done" for line in lines)
    return result


def setup_row(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The setup figures of one speed stage: the random build, then the compiled warm-up's compile
    count and seconds, CUDA graphs, their seconds and pool (empty keys when the stage did not get there)."""
    build = next((line for line in lines if line["event"] == "setup"), {})
    warm = next((line for line in lines if line["event"] == "warmup"), {})
    return {"build_seconds": build.get("random_build_seconds", build.get("load_seconds")),
            **{key: warm.get(key) for key in ("path", "compiles", "compile_seconds", "graphs", "graph_seconds",
                                              "graph_memory_mib", "fallback")}}


def official_stage(check: Check, stage: str) -> dict[str, Any]:
    """The official implementation's figures on the same device, when DSVL2_OFFICIAL is set."""
    if not os.environ.get("DSVL2_OFFICIAL"):
        return {"skipped": "DSVL2_OFFICIAL is not set (see the shared note official-code-on-gpu.md)"}
    variant = stage.split(":")[1]
    command = [sys.executable, str(SHARED / "tools" / "official" / "official_bench.py"), "--variant", variant,
               "--fixture", str(SHARED / "fixtures" / "reference" / "checkpoints" / "tiny"),
               "--device", check.args.device, "--workloads", "1" if check.args.dry_run else OFFICIAL_WORKLOADS[variant]]
    if check.args.dry_run:  # bf16 matmuls crawl on this CPU (no AVX-512): float32, workload 1 only
        command += ["--layers", "2", "--vision-layers", "1", "--new", "4", "--threads", "2", "--dtype", "float32"]
    # Its own packages first; then the carried ones (its huggingface_hub 0.25 needs requests)
    paths = [os.environ.get("DSVL2_OFFICIAL_PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    result = check.run(stage, command, {"PYTHONPATH": os.pathsep.join(p for p in paths if p)})
    log = (check.work / result["log"]).read_text(errors="replace").splitlines()
    result["lines"] = []
    for text in log:
        with contextlib.suppress(ValueError):
            if text.startswith("{"):
                result["lines"].append(json.loads(text))
                check.emit(stage, "workload", **{"variant": variant, **result["lines"][-1]})
    return result


def cog_stage(check: Check, stage: str) -> dict[str, Any]:
    """Cog's HTTP server on the device: its own warm-up budget, one greedy and one sampled request."""
    limit = check.limit(stage)
    command = [sys.executable, "-m", "tools.gpu_check.cog_stage", str(check.work / "cog.json"), "--events", str(check.events),
               "--seconds", str(max(10, round(limit - 15)))]
    env = {"DSVL2_COMPILE": "1" if check.rung.startswith("compiled") else "0"}
    result = check.run(stage, command, env, limit=limit)
    with contextlib.suppress(OSError, ValueError):
        result.update(json.loads((check.work / "cog.json").read_text()))
    result["requests"] = result.get("requests") or [line for line in check.lines(stage="cog", event="prediction")]
    return result


STAGES: dict[str, Callable[[Check, str], dict[str, Any]]] = {
    "preflight": preflight_stage, "parity": parity_stage, "speed": speed_stage, "official": official_stage,
    "cog": cog_stage}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced sizes: exercise every stage")
    parser.add_argument("--call", choices=tuple(CALLS), default="all", help="which device call's stages (default all)")
    parser.add_argument("--call-seconds", type=float, help=f"end every stage by then (default {CALL_SECONDS} s on a GPU)")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.stages = CALLS[args.call]
    args.limits = stage_limits()
    if args.dry_run:  # the CPU's limits only stop a hang; preflight compiles its toy on 2 shared cores
        args.limits = {key: 900 for key in args.limits}
    args.call_seconds = args.call_seconds or (10**6 if args.dry_run else CALL_SECONDS)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the stages; exit 1 when a stage failed or was cut at its limit."""
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    import torch

    name = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    check.report["meta"] = {
        "command": " ".join(["tools/gpu_check/gpu_check.sh", str(args.out_dir), "--call", args.call]
                            + (["--dry-run"] if args.dry_run else [])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run, "device": args.device,
        "device_name": name, "torch": torch.__version__, "python": sys.version.split()[0], "call": args.call,
        "stage_limits": args.limits}
    check.emit("check", "plan", stages=args.stages, limits=args.limits, call_seconds=args.call_seconds,
               device=name, torch=torch.__version__)
    for stage in args.stages:
        try:
            check.report[stage] = STAGES[stage.split(":")[0]](check, stage)
        except Exception as error:  # noqa: BLE001 - a broken stage never stops the next
            check.report[stage] = {"error": f"{type(error).__name__}: {error}"}
            check.emit(stage, "error", error=check.report[stage]["error"])
        check.save()
    print((args.out_dir / "gpu_check.md").read_text())
    failed = [s for s, r in check.report.items() if s != "meta" and (r.get("error") or r.get("timed_out")
                                                                     or r.get("exit_code") not in (None, 0))]
    check.emit("check", "done", failed=failed, seconds=round(time.monotonic() - check.started, 1))
    shutil.rmtree(check.work, ignore_errors=True)  # its logs are in logs.tar.gz
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
