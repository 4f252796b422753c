"""The GPU check: one prepared run on an H100/H200 machine (≤ 7 minutes), or its CPU dry run.

Stages, each a subprocess with its own time limit, so one that breaks or hangs still leaves the
others' results:

* ``parity``: the reference-parity tests (tests/test_reference.py, model sections) with
  ``DSVL2_TEST_DEVICE=cuda`` — float32 against the fixtures' tolerances, and bfloat16 against the
  documented drift bound — plus ``scripts/measure_bf16_drift.py`` for the bf16 figures;
* ``speed``: ``scripts/benchmark.py`` on random weights of the real shapes of tiny, small and
  base, eager and compiled side by side, each variant measuring the target rows the GPU table
  names for it, with the fraction of the memory-bandwidth bound;
* ``official`` (when ``DSVL2_OFFICIAL`` points to the official package): the official code's
  figures on the same device (``../shared/tools/official/official_bench.py``);
* ``cog``: Cog's HTTP server (when cog is importable) answering the demo prompt on the device.

Writes ``OUTDIR/gpu_check.json`` (everything) and ``OUTDIR/gpu_check.md`` (the table).
``--dry-run`` runs every stage on the CPU at reduced sizes (a test runs it in CI).

    scripts/gpu_check.sh OUTDIR [--dry-run]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from reference_data import reference_available  # noqa: E402  (the parity tests' own "fixtures present" rule)

# ../shared beside the checkout; on a GPU machine an ignored copy carried as .shared/
SHARED = Path(os.environ.get("DSVL2_SHARED_DIR") or (REPO_ROOT.parent / "shared" if (REPO_ROOT.parent / "shared").is_dir()
                                                     else REPO_ROOT / ".shared"))
VARIANT_ROWS = {  # the GPU table's rows per variant (docs/benchmark.md)
    "tiny": "decode,ttft,concurrency",
    "small": "decode,e2e_1428,memory",
    "base": "decode,ttft,e2e_demo,memory",
}
OFFICIAL_WORKLOADS = {"tiny": "1", "small": "1,2", "base": "1,3"}


def run_stage(name: str, command: list[str], limit: float, out_dir: Path, env: Optional[dict[str, str]] = None,
              ) -> dict[str, Any]:
    """Run one command with a time limit; its output goes to OUTDIR/<name>.log."""
    log = out_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        # Its own process group, so that a stage past its limit is ended with every child it started
        # (a benchmark under ``bash -c``, Cog's server and its worker).
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            code: Optional[int] = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
            stop_group(process)
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
            "exit_code": code, "timed_out": code is None, "log": log.name}


def stop_group(process: subprocess.Popen) -> None:
    """End a process started with ``start_new_session=True`` and everything it started: SIGTERM,
    then SIGKILL if it is still there 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
            return


def parity_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Reference-parity tests on the device, and the bf16 drift figures (skipped, saying why,
    when the reference fixtures are absent: the parity tests' own convention)."""
    root = Path(reference_env()["DSVL2_REFERENCE_DIR"])
    if not reference_available(root):
        return {"skipped": f"no reference fixtures at {root} (set DSVL2_REFERENCE_DIR, or carry shared/: "
                           "docs/benchmark.md)"}
    junit = out / "parity.xml"
    select = "not processor" + (" and tiny and (small_200x150 or text_only)" if args.dry_run else "")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_reference.py",
               "-k", select, f"--junitxml={junit}"]
    result = run_stage("parity", command, args.limit_parity, out, {"DSVL2_TEST_DEVICE": args.device, **reference_env()})
    result.update(junit_counts(junit))
    drift_json = out / "bf16_drift.json"
    drift = [sys.executable, "scripts/measure_bf16_drift.py", "--device", args.device, "--json", str(drift_json)]
    if args.dry_run:
        drift += ["--configs", "tiny", "--cases", "small_200x150"]
    result["bf16_drift"] = run_stage("bf16_drift", drift, args.limit_drift, out, reference_env())
    if drift_json.is_file():
        result["bf16_drift"]["summary"] = json.loads(drift_json.read_text())["summary"]
    return result


def reference_env() -> dict[str, str]:
    """DSVL2_REFERENCE_DIR as given, else the fixtures under SHARED."""
    return {"DSVL2_REFERENCE_DIR": os.environ.get("DSVL2_REFERENCE_DIR") or str(SHARED / "fixtures" / "reference")}


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / skipped counts and the failing tests' messages from a JUnit XML file."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "failures": ["no JUnit report (the run did not finish)"]}
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{case.get('name')}: {(problem.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def speed_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """benchmark.py per variant: eager and compiled, that variant's target rows."""
    results = {}
    for variant in args.variants:
        json_path = out / f"speed_{variant}.json"
        command = [sys.executable, "scripts/benchmark.py", "--variant", variant, "--device", args.device,
                   "--target-rows", "--rows", VARIANT_ROWS[variant], "--json"]
        if args.dry_run:  # compiling costs minutes on 2 CPU cores: the compiled path runs for tiny only
            command += ["--size", "reduced", "--dtype", "float32", "--new-tokens", "8", "--repeats", "1",
                        "--row-new-tokens-scale", "0.03", "--concurrency", "2", "--max-len", "1792", "--threads", "2",
                        "--modes", "eager,compiled" if variant == "tiny" else "eager"]
        else:
            command += ["--dtype", "bfloat16", "--new-tokens", "64", "--repeats", "2", "--warmup-seconds", "60"]
        wrapped = ["bash", "-c", f'{" ".join(command)} > "{json_path}"']
        result = run_stage(f"speed_{variant}", wrapped, getattr(args, f"limit_speed_{variant}"), out,
                           {"TORCHINDUCTOR_COMPILE_THREADS": "1"} if args.dry_run else None)
        try:  # a run that printed its JSON but lingered at exit past the limit still counts
            result["benchmark"] = json.loads(json_path.read_text())
        except (OSError, ValueError):
            pass
        results[variant] = result
    return results


def official_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The official implementation's figures on the same device, when DSVL2_OFFICIAL is set."""
    if not os.environ.get("DSVL2_OFFICIAL"):
        return {"skipped": "DSVL2_OFFICIAL is not set (see the shared note official-code-on-gpu.md)"}
    results = {}
    for variant in args.variants:
        command = [sys.executable, str(SHARED / "tools" / "official" / "official_bench.py"), "--variant", variant,
                   "--fixture", str(SHARED / "fixtures" / "reference" / "checkpoints" / "tiny"),
                   "--device", args.device, "--workloads", OFFICIAL_WORKLOADS[variant]]
        if args.dry_run:
            command += ["--layers", "2", "--vision-layers", "1", "--new", "4", "--threads", "2"]
        env = {"PYTHONPATH": os.environ.get("DSVL2_OFFICIAL_PYTHONPATH", "")}
        result = run_stage(f"official_{variant}", command, args.limit_official, out, env)
        log = (out / result["log"]).read_text(errors="replace").splitlines()
        result["lines"] = [json.loads(line) for line in log if line.startswith("{")]
        results[variant] = result
    return results


def cog_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Cog's HTTP server on the device answering the demo prompt (tiny random-weight checkpoint)."""
    command = [sys.executable, "scripts/gpu_check_cog.py", str(out / "cog.json")]
    result = run_stage("cog", command, args.limit_cog, out)
    if (out / "cog.json").is_file():
        result.update(json.loads((out / "cog.json").read_text()))
    return result


def markdown(report: dict[str, Any]) -> str:
    """The GPU table (one row per measured target row and mode) and the parity summary."""
    meta = report["meta"]
    lines = [f"# GPU check — {meta['date']}, {meta['device_name']}, torch {meta['torch']}"
             + (" (DRY RUN on the CPU, reduced sizes: no figure here is a GPU figure)" if meta["dry_run"] else ""),
             "", f"Command: `{meta['command']}`", "",
             "| variant | row | target | eager | compiled | bandwidth fraction (eager / compiled) | official |",
             "|---|---|---|---|---|---|---|"]
    for variant, result in report["speed"].items():
        if not isinstance(result, dict):  # the stage was skipped
            lines.append(f"| | speed stage: {result} | | | | | |")
            continue
        bench = result.get("benchmark")
        if not bench:
            lines.append(f"| {variant} | benchmark failed or timed out ({result['seconds']} s, see {result['log']}) "
                         "| | | | | |")
            continue
        for row in bench["target_rows"]:
            values = row["values"]
            fraction = row.get("bandwidth_fraction") or {}
            target = f"{'≥' if row['better'] == 'higher' else '≤'} {row['target']} {row['unit']}" if row["target"] else ""
            official = official_figure(report.get("official", {}), variant, row["key"])
            lines.append(f"| {variant} | {row['row']} | {target} | {fmt(values.get('eager', values.get('load')))} "
                         f"| {fmt(values.get('compiled'))} | {fmt(fraction.get('eager'))} / {fmt(fraction.get('compiled'))} "
                         f"| {official} |")
    parity = report["parity"]
    drift = parity.get("bf16_drift", {}).get("summary", {})
    if "command" not in parity:
        lines += ["", f"Reference parity: {parity.get('skipped')}"]
    else:
        lines += ["", f"Reference parity on {meta['device']}: {parity.get('passed', 0)} passed, "
                  f"{parity.get('failed', 0)} failed, {parity.get('skipped', 0)} skipped ({parity['seconds']} s)."]
    lines += [f"- {failure}" for failure in parity.get("failures", [])[:10]]
    if drift:
        lines.append(f"bf16 drift against the float32 reference: max |Δlogit| {drift['max_logit_diff']:.4f}, "
                     f"{drift['identical']}/{drift['cases']} greedy continuations identical.")
    cog = report["cog"]
    lines.append(f"Cog HTTP server: {cog.get('summary', cog.get('skipped', 'failed, see ' + cog.get('log', '')))}")
    return "\n".join(lines) + "\n"


def official_figure(official: dict[str, Any], variant: str, key: str) -> str:
    """The official code's figure for a row, from the workload that measures the same thing."""
    result = official.get(variant)
    lines = result.get("lines", []) if isinstance(result, dict) else []
    for line in lines:
        workload = line.get("workload", "")
        if key in ("decode", "ttft") and "1 tile" in workload:
            return f"{line['decode_tok_s']} tok/s" if key == "decode" else f"{line['ttft_s']} s (~440 tokens)"
        if (key == "e2e_1428" and "1428" in workload) or (key == "e2e_demo" and "500 new" in workload):
            return f"{line['e2e_s']} s"
    return ""


def fmt(value: Any) -> str:
    """Three significant digits, or blank."""
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced sizes: exercise every stage")
    parser.add_argument("--variants", default="tiny,small,base")
    parser.add_argument("--stages", default="parity,speed,official,cog",
                        help="official runs only when DSVL2_OFFICIAL is set")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.stages = [s for s in args.stages.split(",") if s]
    args.device = "cpu" if args.dry_run else "cuda"
    # Seconds per stage on an H100/H200: parity 75 + drift 30 + speed 70/90/110 + cog 45 = 420 s
    # (7 minutes). The official stage is extra (its own call: --stages official). The dry run's
    # limits only stop a hang.
    limits = dict(parity=75, drift=30, speed_tiny=70, speed_small=90, speed_base=110, official=150, cog=45)
    if args.dry_run:
        limits = {key: 900 for key in limits}
    for key, value in limits.items():
        setattr(args, f"limit_{key}", value)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the stages, write gpu_check.json and gpu_check.md; exit 1 when a stage failed."""
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    name = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    report: dict[str, Any] = {"meta": {
        "command": " ".join(["scripts/gpu_check.sh", str(args.out_dir)] + (["--dry-run"] if args.dry_run else [])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run, "device": args.device,
        "device_name": name, "torch": torch.__version__, "python": sys.version.split()[0]}}
    stages = {"parity": parity_stage, "speed": speed_stage, "official": official_stage, "cog": cog_stage}
    for stage, function in stages.items():
        report[stage] = function(args, args.out_dir) if stage in args.stages else {"skipped": "not asked (--stages)"}
        (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out_dir / "gpu_check.md").write_text(markdown(report))
    print((args.out_dir / "gpu_check.md").read_text())
    codes = [report["parity"].get("exit_code", 0)] + [
        0 if "benchmark" in r else r.get("exit_code") for r in report["speed"].values() if isinstance(r, dict) and "command" in r]
    if "command" in report["cog"]:
        codes.append(report["cog"]["exit_code"])
    failed = any(code != 0 for code in codes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
