"""The GPU check's dry run (tools/gpu_check/gpu_check.sh OUTDIR --dry-run) in CI, so that the prepared GPU
command cannot rot: every stage runs on the CPU at reduced sizes — the preflight's rungs, the
parity tests through the device switch, bf16 drift, the benchmark of every variant (eager, and
the preflight's rung for tiny) with its target rows and a sampled request, and Cog's server
answering a greedy and a sampled request — and the reports agree with the JSON lines written
as the figures came. Unit tests cover what a GPU run cut short must still return."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools.parity.reference_data import reference_available
from tools.gpu_check.check import CALL_SECONDS, CALLS, VARIANT_ROWS, Check, stage_limits, outcome_counts
from tools.gpu_check.report import markdown
from tools.gpu_check.preflight import rung_from_lines

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(["bash", "tools/gpu_check/gpu_check.sh", str(out), "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHON": sys.executable})
    assert (out / "gpu_check.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, json.dumps(report, indent=1)[-4000:]
    return report, (out / "gpu_check.md").read_text(), out


def test_every_variant_measures_its_target_rows_and_a_sampled_request(dry_run) -> None:
    """Every variant's rows; eager and the preflight's rung (compiled on this CPU) side by side for
    tiny (the dry run compiles only tiny: compiling costs a minute on 2 CPU cores)."""
    report, _, _ = dry_run
    assert report["preflight"]["rung"] == "compiled", report["preflight"]
    for variant, rows in VARIANT_ROWS.items():
        result = report[f"speed:{variant}"]
        assert result["complete"] and not result["mode_failed"]
        assert [row["key"] for row in result["benchmark"]["target_rows"]] == rows.split(",")
        line_fields = ("event", "time", "source", "variant")
        rows_as_lines = [{k: v for k, v in row.items() if k not in line_fields} for row in result["rows"]]
        assert rows_as_lines == result["benchmark"]["target_rows"]  # the lines written as measured
        modes = {"eager", "compiled"} if variant == "tiny" else {"eager"}
        for row in result["rows"]:
            assert set(row["values"]) == modes, (variant, row["key"])
            assert all(value > 0 for value in row["values"].values()), (variant, row)
        assert set(result["sampled"]) == modes
        assert all(run["temperature"] == 0.7 and run["top_p"] == 0.9 and run["decode_tokens_per_second"] > 0
                   for run in result["sampled"].values())
        memory = result["memory"]  # the plan beside the allocator's peak (None on the CPU)
        assert memory["decode_states"] == len(modes) and memory["max_allocated"] is None
        assert 0 < memory["estimate_allocated"] < memory["plan"]["total"] == result["benchmark"]["memory"]["plan"]["total"]
    assert report["speed:tiny"]["benchmark"]["warmup_seconds"]["compiled"] > 0
    setup = report["speed:tiny"]["setup"]  # the setup row: compiles counted, the compiled path kept
    assert setup["path"] == "compiled" and setup["compiles"] > 0 and setup["compile_seconds"] > 0, setup
    assert setup["build_seconds"] > 0 and not setup["fallback"]
    assert "speed:tiny setup: build" in dry_run[1] and "compiling <= 20 s" in dry_run[1]


def test_parity_runs_through_the_device_switch(dry_run) -> None:
    report, _, _ = dry_run
    parity = report["parity"]
    if not reference_available():  # the stage says why it did not run, and the script still succeeds
        assert "no reference fixtures" in parity["skipped"] and "DSVL2_REFERENCE_DIR" in parity["skipped"]
        return
    assert parity["exit_code"] == 0 and parity["failed"] == 0
    assert parity["passed"] >= 10  # tiny × 2 cases × the model tests
    assert report["parity"]["bf16_drift"]["summary"]["cases"] == 1


def test_cog_server_answers_a_greedy_and_a_sampled_request(dry_run) -> None:
    report, _, _ = dry_run
    cog = report["cog"]
    assert [r["request"] for r in cog["requests"]] == ["greedy", "sampled"], cog.get("server_log_tail")
    for answer in cog["requests"]:
        assert answer["status"] == "succeeded" and answer["output_chars"] > 0, cog.get("server_log_tail")
        assert answer["metrics"]["output_token_count"] >= 1
    assert cog["requests"][1]["temperature"] == 0.7 and cog["requests"][1]["top_p"] == 0.9
    assert 0 < cog["warmup_budget_seconds"] < report["meta"]["stage_limits"]["cog"]
    phases = " ".join(cog["setup_phases"])  # Service.start timed each phase, and the total
    for phase in ("find/download", "load", "compile", "capture", "warm-up request"):
        assert f"setup phase {phase}" in phases, cog["setup_phases"]
    assert cog["setup_phases"][-1].startswith("setup total: ")


def test_reports_agree_and_four_files_come_back(dry_run) -> None:
    report, text, out = dry_run
    assert "DRY RUN" in text
    rows = sum(len(report[f"speed:{v}"]["rows"]) for v in VARIANT_ROWS)
    assert text.count("\n| ") - 1 == rows  # the header line starts the same way; the separator does not
    assert markdown(report) == text
    assert sorted(p.name for p in out.iterdir()) == ["events.jsonl", "gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert {line.get("stage") or line.get("source") for line in lines} >= {"check", "preflight", "parity", "benchmark", "cog"}


def test_a_stage_cut_at_its_limit_keeps_its_lines_and_the_next_stage_runs(tmp_path) -> None:
    """A stage's figures are lines written as measured: a stage ended at its limit leaves them, and
    the stage status says it was cut."""
    args = SimpleNamespace(out_dir=tmp_path, call_seconds=600, limits={"slow": 600, "next": 600})
    check = Check(args)
    writer = ("import json, sys, time; f = open(sys.argv[1], 'a'); "
              "f.write(json.dumps({'stage': 'slow', 'event': 'figure', 'value': 1}) + '\\n'); f.flush(); time.sleep(120)")
    started = time.monotonic()
    result = check.run("slow", [sys.executable, "-c", writer, str(check.events)], limit=3)
    assert result["timed_out"] and time.monotonic() - started < 30
    assert [line["value"] for line in check.lines(stage="slow", event="figure")] == [1]
    assert check.run("next", [sys.executable, "-c", "print('ok')"], limit=30)["exit_code"] == 0
    check.report = {"meta": {}, "slow": result}
    check.save()
    assert "CUT at its limit" in (tmp_path / "gpu_check.md").read_text()


def test_parity_counts_come_from_the_log_as_far_as_it_got(tmp_path) -> None:
    log = tmp_path / "parity.log"
    log.write_text("collecting ... collected 9 items\n"
                   "tests/parity/test_reference.py::test_a[tiny-x] PASSED [ 11%]\n"
                   "tests/parity/test_reference.py::test_b[tiny-x] FAILED [ 22%]\n"
                   "tests/parity/test_reference.py::test_c[tiny-x] SKIPPED (no outputs) [ 33%]\n")  # cut here
    counts = outcome_counts(log)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["tests/parity/test_reference.py::test_b[tiny-x]"]
    assert outcome_counts(tmp_path / "missing.log")["failures"]


def test_the_preflight_picks_the_fastest_rung_that_worked_and_says_why() -> None:
    lines = [{"event": "rung", "rung": "eager", "ok": True},
             {"event": "rung", "rung": "compiled+graphs", "ok": False, "error": "InvalidCxxCompiler"}]
    assert rung_from_lines(lines, "cuda") == ("eager", "compiled+graphs: InvalidCxxCompiler")
    assert rung_from_lines(lines[:1], "cuda")[0] == "eager"  # the faster rung never answered (time limit)
    assert "not reached" in rung_from_lines(lines[:1], "cuda")[1]
    assert rung_from_lines([], "cuda")[0] == "eager"
    tools = {"event": "toolchain", "c_compiler": "/usr/bin/gcc", "python_headers": "/x/Python.h", "triton": "3.6.0"}
    rung, why = rung_from_lines([tools, *lines[:1]], "cuda")  # the compiled toy outlasted the limit
    assert rung == "compiled+graphs" and "tried anyway" in why
    assert rung_from_lines([{**tools, "python_headers": None}, *lines[:1]], "cuda")[0] == "eager"
    assert rung_from_lines([tools, *lines], "cuda")[0] == "eager"  # it failed: not tried again
    assert rung_from_lines([{"event": "rung", "rung": "compiled", "ok": True}], "cpu") == ("compiled", "the fastest rung works")


def test_each_call_fits_its_time_limit() -> None:
    """The stage limits (compiles × seconds per compile + the rest, docs/benchmark.md) of each of
    the two device calls add up to less than the call's limit."""
    limits = stage_limits()
    for call in ("1", "2"):
        total = sum(limits[stage] for stage in CALLS[call]) + (limits["bf16_drift"] if "parity" in CALLS[call] else 0)
        assert total <= CALL_SECONDS, (call, total, limits)


SCRIPTS_OF_THE_CHECK = ("tools.gpu_check.check", "tools.gpu_check.cog_stage", "tools.benchmark",
                        "tools.parity.measure_drift")


def test_scripts_import_without_pytest_or_pygments() -> None:
    """The GPU machine has no pytest (nor pygments, which pytest imports): every script of the check
    but the parity tests must import without them (reference_data imports pytest lazily). One
    process imports them all (torch once); each failure is named."""
    code = ("import importlib, sys, traceback; sys.modules['pytest'] = None; sys.modules['pygments'] = None\n"
            "failed = []\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc(limit=-2))\n"
            "sys.exit('\\n'.join(failed) or None)\n")
    done = subprocess.run([sys.executable, "-c", code, *SCRIPTS_OF_THE_CHECK], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped counts as ended)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.fixture
def fake_cog(tmp_path) -> tuple[dict, Path]:
    """A stand-in for Cog's server that never gets READY and starts a 'worker': both record their pids."""
    server = tmp_path / "fake" / "cog" / "server"
    server.mkdir(parents=True)
    (server.parent / "__init__.py").write_text("")
    (server / "__init__.py").write_text("")
    (server / "http.py").write_text(
        "import os, subprocess, sys, time\n"
        "folder = os.environ['FAKE_PIDS']\n"
        "open(f'{folder}/server', 'w').write(str(os.getpid()))\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open(f'{folder}/worker', 'w').write(str(worker.pid))\n"
        "time.sleep(600)\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FAKE_PIDS": str(pids)}
    return env, pids


def _wait_for(path: Path, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.2)
    return int(path.read_text())


@pytest.mark.slow  # runs the stage's script in processes of its own
def test_the_cog_stage_ends_its_server_and_worker_at_its_deadline(fake_cog, tmp_path) -> None:
    env, pids = fake_cog
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check.cog_stage", str(tmp_path / "cog.json"), "--seconds", "8"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    result = json.loads((tmp_path / "cog.json").read_text())
    assert result["setup_status"] != "READY" and result["requests"] == []
    server, worker = _wait_for(pids / "server"), _wait_for(pids / "worker")
    time.sleep(1)
    assert not _alive(server) and not _alive(worker)


@pytest.mark.slow  # runs the stage's script in processes of its own
def test_the_cog_stage_ends_its_server_and_worker_when_the_check_ends_it(fake_cog, tmp_path) -> None:
    """The check ends a stage past its limit with SIGTERM to the stage's process group; Cog's
    server runs in its own process group, so the stage must end it (and its worker) itself."""
    env, pids = fake_cog
    stage = subprocess.Popen([sys.executable, "-m", "tools.gpu_check.cog_stage", str(tmp_path / "cog.json"), "--seconds", "300"],
                             cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    server, worker = _wait_for(pids / "server"), _wait_for(pids / "worker")
    os.killpg(stage.pid, 15)
    assert stage.wait(timeout=30) != 0
    time.sleep(1)
    assert not _alive(server) and not _alive(worker)


def _wheel(folder: Path, name: str, broken: bool = False) -> Path:
    """A minimal wheel of a one-module distribution ``name`` (or a file that is no zip at all)."""
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    if broken:
        path.write_text("not a zip")
        return path
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}_marker.py", "CARRIED = True\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow  # runs the stage's script in processes of its own
def test_carried_wheels_install_only_what_the_machine_lacks_and_a_failure_goes_on(tmp_path) -> None:
    """A carried wheel of a distribution the interpreter has (packaging here) is not installed (it
    would shadow the machine's own); a missing one is; a wheel that cannot install is reported and
    the check still starts (no `set -e` abort)."""
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    wheels.mkdir()
    _wheel(wheels, "packaging")
    _wheel(wheels, "dsvl2_carried_probe")
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "WHEELS_TARGET": str(target)}
    done = subprocess.run(["bash", "tools/gpu_check/gpu_check.sh", str(tmp_path / "out"), "--call", "none"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "invalid choice: 'none'" in done.stderr  # gpu_check.py started
    assert "dsvl2_carried_probe-1.0" in done.stdout and "packaging-1.0" not in done.stdout
    assert (target / "dsvl2_carried_probe_marker.py").is_file() and not (target / "packaging_marker.py").exists()
    _wheel(wheels, "dsvl2_broken_probe", broken=True)
    done = subprocess.run(["bash", "tools/gpu_check/gpu_check.sh", str(tmp_path / "out"), "--call", "none"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "warning" in done.stderr and done.returncode == 2 and "invalid choice: 'none'" in done.stderr
