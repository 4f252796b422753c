"""The guard of the streaming bridge (deepseek_vl2/serving/coglet_bridge.py): it installs only on
the coglet it was read against, can be turned off, and its future runs cancel hooks. The bridge
itself is exercised through Cog's real server in tests/server/test_concurrency.py."""
from __future__ import annotations

import asyncio
import threading

import pytest

from deepseek_vl2.serving import coglet_bridge


@pytest.fixture(autouse=True)
def restore():
    yield
    coglet_bridge.uninstall()


def test_installs_on_the_pinned_coglet(monkeypatch) -> None:
    monkeypatch.setattr(coglet_bridge, "coglet_version", lambda: coglet_bridge.SUPPORTED_COGLET)
    installed, line = coglet_bridge.install()
    assert installed and "stream" in line
    assert asyncio.run_coroutine_threadsafe is not coglet_bridge._original_submit


@pytest.mark.parametrize("found", ["0.23.2", "0.24.0", None])
def test_other_coglet_versions_fall_back_to_collecting(monkeypatch, found) -> None:
    monkeypatch.setattr(coglet_bridge, "coglet_version", lambda: found)
    installed, line = coglet_bridge.install()
    assert not installed and "no streaming" in line and str(found) in line
    assert asyncio.run_coroutine_threadsafe is coglet_bridge._original_submit


def test_collect_mode_turns_it_off(monkeypatch) -> None:
    monkeypatch.setattr(coglet_bridge, "coglet_version", lambda: coglet_bridge.SUPPORTED_COGLET)
    installed, _ = coglet_bridge.install("collect")
    assert not installed and asyncio.run_coroutine_threadsafe is coglet_bridge._original_submit


def test_cancelling_the_future_runs_the_predictions_hooks(monkeypatch) -> None:
    """As coglet does: submit a coroutine from another thread, let it finish, then cancel() the
    finished future: the hook the coroutine registered still runs."""
    monkeypatch.setattr(coglet_bridge, "coglet_version", lambda: coglet_bridge.SUPPORTED_COGLET)
    assert coglet_bridge.install()[0]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fired = threading.Event()

    async def run() -> str:
        hooks = coglet_bridge.cancel_hooks()
        assert hooks is not None
        hooks.append(fired.set)
        return "generator"

    try:
        future = asyncio.run_coroutine_threadsafe(run(), loop)
        assert future.result(timeout=10) == "generator"
        assert not fired.is_set()
        future.cancel()  # already done: a plain future would reach nothing
        assert fired.is_set()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_outside_a_server_there_are_no_hooks_unless_asked() -> None:
    assert coglet_bridge.cancel_hooks() is None
    with coglet_bridge.direct_call() as hooks:
        assert coglet_bridge.cancel_hooks() is hooks
    assert coglet_bridge.cancel_hooks() is None
