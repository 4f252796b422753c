"""Cog's real HTTP server with DSVL2_QUANTIZE=int8 / fp8 streams an answer (test checkpoint, CPU)."""
from __future__ import annotations

import pytest

from tools.testing.cog_server import cog_server, data_uri
from tools.checkpoints import make_checkpoint

REPO_IMAGE = "demo.png"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), variant="tiny", seed=6, eos_boost=0.0)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_prediction_streams_with_8bit_experts(checkpoint, fmt: str) -> None:
    from tools.testing.cog_server import REPO_ROOT

    with cog_server("predict.py:Predictor", weights=checkpoint, env={"DSVL2_QUANTIZE": fmt}, retry_busy=10) as server:
        status, events = server.predict_stream({"image": data_uri(REPO_ROOT / REPO_IMAGE), "prompt": "Describe it.",
                                                "temperature": 0, "max_length_tokens": 8})
        log = server.log()
    assert status == 200, events
    assert events[0].event == "start" and events[-1].event == "completed"
    assert events[-1].data["status"] == "succeeded"
    chunks = [event.data["chunk"] for event in events if event.event == "output"]
    assert len(chunks) > 1 and "".join(chunks).strip()
    assert f"experts in {fmt} (DSVL2_QUANTIZE={fmt})" in log


def test_predict_local_takes_quantize(checkpoint) -> None:
    import subprocess
    import sys

    from tools.testing.cog_server import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "scripts/predict_local.py", "--weights", str(checkpoint), "--image", REPO_IMAGE,
         "--prompt", "Describe <image>.", "--max-length-tokens", "4", "--temperature", "0", "--quantize", "fp8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    assert "experts in fp8 (DSVL2_QUANTIZE=fp8)" in result.stderr
