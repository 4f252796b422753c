"""Continuous batching: many requests share one KV cache and one decode step.

A background thread runs the loop. Each turn it (1) admits waiting requests into free cache
slots, (2) prefills one chunk of one admitting request (so a long multi-image prompt delays the
others by at most one chunk per turn), and (3) runs one batched decode step for every request
that is generating, each with its own sampling parameters, seed and stop rule. Requests stream
their own text through a :class:`RequestHandle`; cancelling one frees its slot at the next turn;
an exception inside one request fails that request only.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from typing import AsyncIterator, Iterator, Optional

from .generation import Generator, Request
from deepseek_vl2.inputs.processor import ProcessedInputs
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_DONE = object()


class CapacityError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class RequestHandle:
    """One submitted request: iterate it (sync or async) for text pieces; ``cancel()`` to stop it.

    Sync iteration blocks on a thread-safe queue. Async iteration switches delivery to an
    ``asyncio.Queue`` fed with ``call_soon_threadsafe``, so no executor thread waits per request.
    """

    def __init__(self, seq: Request) -> None:
        self.seq = seq
        self.cancelled = threading.Event()
        self._events: "queue.Queue[object]" = queue.Queue()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._async_events: Optional[asyncio.Queue] = None

    @property
    def stats(self):
        return self.seq.stats

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the scheduler's next turn."""
        self.cancelled.set()

    def _put(self, item: object) -> None:
        with self._lock:
            if self._loop is None:
                self._events.put(item)
                return
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self.cancel()

    @staticmethod
    def _unwrap(item: object) -> object:
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[str]:
        while (item := self._unwrap(self._events.get())) is not _DONE:
            yield item  # type: ignore[misc]

    async def __aiter__(self) -> AsyncIterator[str]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
            while not self._events.empty():
                self._async_events.put_nowait(self._events.get_nowait())
        while (item := self._unwrap(await self._async_events.get())) is not _DONE:
            yield item  # type: ignore[misc]


class BatchScheduler:
    """Runs requests of one :class:`Generator` concurrently in ``max_batch`` cache slots."""

    def __init__(self, generator: Generator, max_batch: int = 8, max_len: Optional[int] = None,
                 max_waiting: int = 64) -> None:
        self.generator = generator
        self.max_batch = max_batch
        self.max_len = max_len or generator.context_length
        self.max_waiting = max_waiting
        generator.reserve(max_batch, self.max_len)  # the persistent decode state, grown once if needed
        self.engine = generator.engine
        self._waiting: deque[RequestHandle] = deque()
        self._prefilling: deque[RequestHandle] = deque()
        self._decoding: list[RequestHandle] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsvl2-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- API
    def submit(self, inputs: ProcessedInputs, params: SamplingParams) -> RequestHandle:
        """Queue a request; bad parameters or a prompt that cannot fit raise here, in the caller."""
        seq = self.generator.new_sequence(inputs, params, slot=-1, limit=self.max_len)  # raises ContextLengthError
        handle = RequestHandle(seq)
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise CapacityError(f"the server is at capacity ({self.max_waiting} requests waiting); retry shortly")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def close(self) -> None:
        """Stop the loop thread (pending requests are failed)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._prefilling) + len(self._decoding)

    @property
    def cache(self):
        """The KV cache of the generator's persistent decode state (shared with ``Generator.stream``)."""
        return self.engine.state.cache

    # ----------------------------------------------------------------------------- loop
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._waiting or self._prefilling or self._decoding):
                    self._wake.wait()
                if self._stopping:
                    break
                while self._waiting and self.active < self.max_batch and self.engine.free_slots:
                    handle = self._waiting.popleft()
                    handle.seq.slot = self.engine.acquire()
                    self._prefilling.append(handle)
            self._drop_cancelled()
            self._prefill_one_chunk()
            self._decode_step()
        for handle in [*self._waiting, *self._prefilling, *self._decoding]:
            handle._put(RuntimeError("the server is shutting down"))

    def _release(self, handle: RequestHandle, error: Optional[BaseException] = None) -> None:
        if handle.seq.slot >= 0:
            self.engine.release(handle.seq.slot)
            handle.seq.slot = -1
        handle.seq.embeds = None
        handle._put(error if error is not None else _DONE)

    def _drop_cancelled(self) -> None:
        for group in (self._prefilling, self._decoding):
            for handle in [h for h in group if h.cancelled.is_set()]:
                group.remove(handle)
                handle.seq.stats.finish_reason = "cancelled"
                self._release(handle)
        with self._wake:
            for handle in [h for h in self._waiting if h.cancelled.is_set()]:
                self._waiting.remove(handle)
                handle._put(_DONE)

    def _prefill_one_chunk(self) -> None:
        if not self._prefilling:
            return
        handle = self._prefilling[0]
        try:
            done = self.generator.prefill_step(handle.seq)
            if done:
                self._prefilling.popleft()
                self._emit([handle], self.generator.sample([handle.seq], handle.seq.next_logits.unsqueeze(0)))
                if not handle.seq.finished:
                    self._decoding.append(handle)
            else:
                self._prefilling.rotate(-1)  # round robin between long prompts
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("prefill failed")
            self._prefilling.remove(handle)
            self._release(handle, err)

    def _decode_step(self) -> None:
        batch = [h for h in self._decoding if not h.seq.finished]
        if not batch:
            return
        try:
            self._emit(batch, self.generator.decode([h.seq for h in batch]))
        except Exception as err:  # noqa: BLE001 - retry one by one so only the failing request fails
            log.exception("batched decode failed; retrying requests one at a time")
            if len(batch) == 1:
                self._decoding.remove(batch[0])
                self._release(batch[0], err)
                return
            for handle in batch:
                try:
                    self._emit([handle], self.generator.decode([handle.seq]))
                except Exception as err:  # noqa: BLE001
                    self._decoding.remove(handle)
                    self._release(handle, err)

    def _emit(self, batch: list[RequestHandle], pieces: list[str]) -> None:
        for handle, piece in zip(batch, pieces):
            if piece:
                handle._put(piece)
            if handle.seq.finished:
                if handle in self._decoding:
                    self._decoding.remove(handle)
                self._release(handle)
