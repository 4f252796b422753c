"""The README's no-Docker prediction command works end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.checkpoints import make_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a whole run of the script in a process of its own
def test_predict_local_streams_an_answer_and_logs_to_stderr(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", variant="tiny", seed=2)
    result = subprocess.run(
        [sys.executable, "scripts/predict_local.py", "--weights", str(checkpoint), "--image", "demo.png",
         "--prompt", "Describe each stage of this <image> in detail", "--max-length-tokens", "5",
         "--temperature", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "the answer goes to stdout"
    assert "prompt tokens:" not in result.stdout and "prompt tokens:" in result.stderr
    assert "global view + 3x2 local tiles" in result.stderr  # demo.png is 1000×500
