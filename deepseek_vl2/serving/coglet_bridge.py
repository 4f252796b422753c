"""Streaming *and* cancellable async predictions on coglet 0.23.1 (Cog's Rust server).

What coglet 0.23.1 does (crates/coglet-python/src/predictor.rs and worker_bridge.rs):

* an ``async def run`` that is an async generator is drained into a list before any item is
  sent, so nothing streams;
* an ``async def run`` that *returns a sync generator* streams: coglet iterates the generator in
  the prediction's slot thread and sends each item at once; but a cancel then only calls
  ``cancel()`` on the already finished ``concurrent.futures.Future`` that
  ``asyncio.run_coroutine_threadsafe`` returned, which reaches nothing.

The bridge: coglet submits every async prediction with ``asyncio.run_coroutine_threadsafe``,
looked up on the ``asyncio`` module at each call. :func:`install` wraps that function so the
future it returns also runs this prediction's cancel hooks when coglet cancels it, and so the
coroutine finds its hook list in a context variable (:func:`cancel_hooks`). A generator
returned by run() registers a hook that stops its request, and then raises
``asyncio.CancelledError``, which coglet reports as ``canceled``.

Guarded: the bridge installs only on the coglet version it was checked against
(:data:`SUPPORTED_COGLET`), and the streaming setting "collect" (``DSVL2_STREAMING=collect``,
read into :class:`~deepseek_vl2.engine.config.EngineConfig`) turns it off. Without it (or when a
prediction finds no hook list) run() uses the supported mode: the coroutine collects the answer
and returns it at the end, cancellable at any time (no streaming).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator, Optional

from deepseek_vl2.engine.config import STREAMING_ENV, StreamingMode

SUPPORTED_COGLET = "0.23.1"

_hooks: contextvars.ContextVar[Optional[list[Callable[[], None]]]] = contextvars.ContextVar(
    "dsvl2_cancel_hooks", default=None
)
_original_submit = asyncio.run_coroutine_threadsafe


class _CancelAwareFuture(concurrent.futures.Future):
    """The future coglet keeps for a prediction; cancel() also runs the prediction's hooks."""

    _dsvl2_hooks: list[Callable[[], None]]

    def cancel(self) -> bool:
        cancelled = super().cancel()  # still stops a coroutine that has not returned yet
        for hook in list(self._dsvl2_hooks):
            hook()
        return cancelled


def _submit_with_hooks(coro: Any, loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future:
    hooks: list[Callable[[], None]] = []

    async def with_hooks() -> Any:
        _hooks.set(hooks)
        return await coro

    future = _original_submit(with_hooks(), loop)
    future.__class__ = _CancelAwareFuture
    future._dsvl2_hooks = hooks  # type: ignore[attr-defined]
    return future


def coglet_version() -> Optional[str]:
    """The installed coglet's version, or None when it is not installed."""
    try:
        return version("coglet")
    except PackageNotFoundError:
        return None


def install(mode: StreamingMode = "auto") -> tuple[bool, str]:
    """Install the bridge if ``mode`` is "auto" and this server supports it; (installed, a line for the log)."""
    if mode == "collect":
        return False, f"{STREAMING_ENV}=collect: answers are sent when complete (no streaming)"
    found = coglet_version()
    if found != SUPPORTED_COGLET:
        return False, (
            f"coglet {found} is not {SUPPORTED_COGLET}, the version the streaming bridge was "
            "checked against: answers are sent when complete (no streaming)"
        )
    if asyncio.run_coroutine_threadsafe is not _submit_with_hooks:
        if asyncio.run_coroutine_threadsafe is not _original_submit:
            return False, "asyncio.run_coroutine_threadsafe is already replaced: no streaming"
        asyncio.run_coroutine_threadsafe = _submit_with_hooks
    return True, f"coglet {found}: answers stream as they are generated; cancel stops them"


def uninstall() -> None:
    """Put the original ``asyncio.run_coroutine_threadsafe`` back (tests)."""
    if asyncio.run_coroutine_threadsafe is _submit_with_hooks:
        asyncio.run_coroutine_threadsafe = _original_submit


@contextlib.contextmanager
def direct_call() -> Iterator[list[Callable[[], None]]]:
    """Run predictions outside Cog's server (a script calling run()) the way the bridge runs
    them: run() returns a generator that streams; calling the yielded hooks cancels it."""
    hooks: list[Callable[[], None]] = []
    token = _hooks.set(hooks)
    try:
        yield hooks
    finally:
        _hooks.reset(token)


def cancel_hooks() -> Optional[list[Callable[[], None]]]:
    """The running prediction's cancel hooks, or None when it was not submitted via the bridge."""
    return _hooks.get()
