"""The GPU check's dry run (scripts/gpu_check.sh OUTDIR --dry-run) in CI, so that the prepared GPU
command cannot rot: every stage runs on the CPU at reduced sizes — the parity tests through the
device switch, bf16 drift, the benchmark of every variant eager and compiled with its target rows,
and Cog's server answering the demo prompt — and both reports are written and agree."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reference_data import reference_available
from scripts.gpu_check import VARIANT_ROWS, junit_counts, markdown

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=3600,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert (out / "gpu_check.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, json.dumps(report, indent=1)[-4000:]
    return report, (out / "gpu_check.md").read_text()


def test_every_variant_measures_its_target_rows(dry_run) -> None:
    """Every variant's rows; eager and compiled side by side for tiny (the dry run compiles only
    tiny: compiling costs minutes on 2 CPU cores; on the GPU every variant runs both)."""
    report, _ = dry_run
    for variant, rows in VARIANT_ROWS.items():
        bench = report["speed"][variant]["benchmark"]
        assert [row["key"] for row in bench["target_rows"]] == rows.split(",")
        modes = {"eager", "compiled"} if variant == "tiny" else {"eager"}
        for row in bench["target_rows"]:
            assert set(row["values"]) == modes, (variant, row["key"])
            assert all(value > 0 for value in row["values"].values()), (variant, row)
    assert report["speed"]["tiny"]["benchmark"]["warmup_seconds"]["compiled"] > 0


def test_parity_runs_through_the_device_switch(dry_run) -> None:
    report, _ = dry_run
    parity = report["parity"]
    if not reference_available():  # the stage says why it did not run, and the script still succeeds
        assert "no reference fixtures" in parity["skipped"] and "DSVL2_REFERENCE_DIR" in parity["skipped"]
        return
    assert parity["exit_code"] == 0 and parity["failed"] == 0
    assert parity["passed"] >= 10  # tiny × 2 cases × the model tests
    assert report["parity"]["bf16_drift"]["summary"]["cases"] == 1


def test_cog_server_answers_the_demo_prompt(dry_run) -> None:
    report, _ = dry_run
    cog = report["cog"]
    assert cog["status"] == "succeeded" and cog["output_chars"] > 0, cog.get("server_log_tail")
    assert cog["metrics"]["output_token_count"] >= 1


def test_markdown_has_one_row_per_measured_row(dry_run) -> None:
    report, text = dry_run
    assert "DRY RUN" in text
    rows = sum(len(r["benchmark"]["target_rows"]) for r in report["speed"].values())
    assert text.count("\n| ") - 1 == rows  # the header line starts the same way; the separator does not
    assert markdown(report) == text


def test_junit_counts_reads_failures(tmp_path) -> None:
    path = tmp_path / "r.xml"
    path.write_text('<testsuite><testcase name="a"/><testcase name="b"><failure message="boom"/></testcase>'
                    '<testcase name="c"><skipped/></testcase></testsuite>')
    counts = junit_counts(path)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["b: boom"]
    assert junit_counts(tmp_path / "missing.xml")["failures"]


@pytest.mark.parametrize("module", ["scripts.gpu_check", "scripts.gpu_check_cog", "scripts.benchmark",
                                    "scripts.measure_bf16_drift"])
def test_scripts_import_without_pytest_or_pygments(module: str) -> None:
    """The GPU machine has no pytest (nor pygments, which pytest imports): every script of the check
    but the parity tests must import without them (reference_data imports pytest lazily)."""
    code = ("import sys; sys.modules['pytest'] = None; sys.modules['pygments'] = None; "
            "sys.path.insert(0, 'tests'); import importlib; importlib.import_module(sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, module], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
