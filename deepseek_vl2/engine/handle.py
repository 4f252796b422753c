"""What a scheduler hands its caller for one request: a :class:`RequestHandle` to read text from.

The handle carries no generation state (that is the :class:`~.request.Request` it points to):
only the queue its text pieces travel through, from the scheduler's thread to one consumer.
No wait is unbounded: a consumer waits at most ``POLL_SECONDS`` at a time and then asks the
scheduler's ``fault`` check; a fault (the loop stopped, or a step stuck beyond its limit) ends the
iteration with that error and cancels the request.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator, Callable, Iterator, Optional

from .request import GenerationStats, Request

POLL_SECONDS = 1.0  # how long a consumer waits for text before it checks the scheduler's health
FaultCheck = Callable[[], Optional[BaseException]]


class _End:
    """The last item of a stream: ``error`` None for a normal end."""

    def __init__(self, error: Optional[BaseException]) -> None:
        self.error = error


class RequestHandle:
    """One submitted request: iterate it (sync or async) for text pieces; ``cancel()`` to stop it.

    The scheduler's thread calls :meth:`deliver` for each piece and :meth:`close` once at the
    end. Sync iteration blocks on a thread-safe queue. Async iteration switches delivery to an
    ``asyncio.Queue`` fed with ``call_soon_threadsafe``, so no executor thread waits per request.
    """

    def __init__(self, request: Request, fault: FaultCheck = lambda: None) -> None:
        self.request = request
        self._fault = fault
        self._events: "queue.Queue[object]" = queue.Queue()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._async_events: Optional[asyncio.Queue] = None

    @property
    def stats(self) -> GenerationStats:
        """The request's counts and timings (final once iteration has ended)."""
        return self.request.stats

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the scheduler's next turn."""
        self.request.cancel()

    def deliver(self, piece: str) -> None:
        """Send one text piece to the consumer (called by the scheduler's thread)."""
        self._send(piece)

    def close(self, error: Optional[BaseException] = None) -> None:
        """End the stream: iteration stops, raising ``error`` when one is given."""
        self._send(_End(error))

    def _send(self, item: object) -> None:
        with self._lock:
            if self._loop is None:
                self._events.put(item)
                return
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self.cancel()

    @staticmethod
    def _is_end(item: object) -> bool:
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            return True
        return False

    def _check_fault(self) -> None:
        """Raise the scheduler's fault, if it has one, after asking for the request to stop."""
        if (error := self._fault()) is not None:
            self.cancel()
            raise error

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                item = self._events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_fault()
                continue
            if self._is_end(item):
                return
            yield item  # type: ignore[misc]

    async def __aiter__(self) -> AsyncIterator[str]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
            while not self._events.empty():
                self._async_events.put_nowait(self._events.get_nowait())
        events = self._async_events
        getter: Optional[asyncio.Future] = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=POLL_SECONDS)
                if not done:
                    self._check_fault()
                    continue
                item, getter = getter.result(), None
                if self._is_end(item):
                    return
                yield item  # type: ignore[misc]
        finally:
            if getter is not None:
                getter.cancel()
