"""Through Cog's real server: when the engine's loop cannot go on, the prediction it was running fails
saying so, the next fails at once with the same message, and /health-check reports UNHEALTHY
instead of READY (predict.py ``healthcheck``)."""
from __future__ import annotations

import time
from pathlib import Path

from tools.checkpoints import make_checkpoint
from tools.testing.cog_server import cog_server


def test_a_stopped_engine_fails_predictions_at_once_and_reports_unhealthy(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", variant="tiny", seed=7)
    with cog_server("tools/testing/stopping_predictor.py:StoppingPredictor", weights=checkpoint,
                    env={"COG_MAX_CONCURRENCY": "2"}) as server:
        assert server.health()["status"] == "READY"
        inputs = {"prompt": "What is two plus two?", "temperature": 0, "max_length_tokens": 8}
        status, body = server.predict(inputs)
        assert status == 200 and body["status"] == "failed", body
        assert "the engine stopped after an internal error (EngineLost: the device was lost)" in body["error"]
        started = time.monotonic()
        status, body = server.predict(inputs)
        assert body["status"] == "failed" and "until the server restarts" in body["error"], body
        assert time.monotonic() - started < 5
        health = server.health()
        assert health["status"] == "UNHEALTHY", health
