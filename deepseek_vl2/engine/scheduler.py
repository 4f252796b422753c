"""Continuous batching: many requests share one KV cache and one decode step.

The policy is :func:`schedule`, a pure function: given the waiting, prefilling and decoding
requests, the free slots and the batch limit, it returns the turn's :class:`Plan` — which
waiting requests take a slot (oldest first), which request's next prompt chunk runs (so a long
multi-image prompt delays the others by at most one chunk per turn; prompts take turns), and
which requests take one batched decode step together, each with its own sampling parameters,
seed and stop rule.

:class:`BatchScheduler` is the driver, and the one way a request runs: a background thread that
asks for a plan each turn and carries it out, a condition variable that wakes it, and delivery of
each request's text through its :class:`~.handle.RequestHandle`. It alone hands out the decode
state's slots (one scheduler per :class:`~.generation.Generator` at a time). :meth:`BatchScheduler.run`
is the single-request call (warm-up, tools, tests): submit, wait for the end, return the
:class:`~.request.Request` (its tokens, stats and, when asked, per-token logits). Cancelling a request ends it at the next turn. A failure
fails its own request only: a prefill or a token's bookkeeping belongs to one request; a failed
batched decode step is rewound (every request of the step back to what it has recorded, see
:meth:`~.generation.Generator.rewind`) and each request is stepped alone, so the one that fails
alone fails and the others go on with exactly the tokens they would have had.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Generic, Optional, Sequence, TypeVar

from deepseek_vl2.inputs.processor import ProcessedInputs
from .config import DEFAULT_MAX_WAITING
from .generation import Generator
from .handle import RequestHandle
from .request import Request
from .sampling import SamplingParams

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class CapacityError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass(frozen=True)
class Plan(Generic[Item]):
    """One turn of the scheduler."""

    admit: tuple[Item, ...]  # waiting requests that take a slot now (the front of the queue, in order)
    prefill: Optional[Item]  # the request whose next prompt chunk runs
    decode: tuple[Item, ...]  # the requests that take one decode step together


def schedule(waiting: Sequence[Item], prefilling: Sequence[Item], decoding: Sequence[Item], free_slots: int,
             max_batch: int) -> Plan[Item]:
    """The policy: what runs this turn (no side effects; see the module docstring).

    ``waiting``: requests without a slot, oldest first; ``prefilling``: those whose prompt is
    going in, the next to run first; ``decoding``: those generating. ``free_slots``: slots of the
    decode state nobody holds; ``max_batch``: requests that may hold a slot at once.
    """
    room = max(0, min(free_slots, max_batch - len(prefilling) - len(decoding)))
    admit = tuple(islice(waiting, room))
    queue = [*prefilling, *admit]
    return Plan(admit=admit, prefill=queue[0] if queue else None, decode=tuple(decoding))


class BatchScheduler:
    """Runs the requests of one :class:`Generator` concurrently in ``max_batch`` cache slots.

    ``max_batch`` defaults to the decode state's slots, ``max_len`` to the model's context. A
    generator has one scheduler at a time: :meth:`close` it (or leave its ``with`` block) before
    building another over the same generator.
    """

    def __init__(self, generator: Generator, max_batch: Optional[int] = None, max_len: Optional[int] = None,
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if generator.scheduler is not None:
            raise RuntimeError("this generator already has a running scheduler (it alone hands out the decode "
                               "state's slots); close that one first")
        self.generator = generator
        self.max_batch = max_batch or generator.engine.slots
        self.max_len = max_len or generator.context_length
        self.max_waiting = max_waiting
        generator.reserve(self.max_batch, self.max_len)  # the persistent decode state, grown once if needed
        generator.scheduler = self
        self.engine = generator.engine
        self._waiting: deque[RequestHandle] = deque()
        self._prefilling: deque[RequestHandle] = deque()
        self._decoding: list[RequestHandle] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsvl2-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- API
    def submit(self, inputs: ProcessedInputs, params: SamplingParams, *, record_logits: bool = False) -> RequestHandle:
        """Queue a request; a prompt that cannot fit or a full queue raise here, in the caller.

        ``record_logits``: the request keeps the logits each token was chosen from (``step_logits``)."""
        request = self.generator.new_request(inputs, params, limit=self.max_len, record_logits=record_logits)
        handle = RequestHandle(request)
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise CapacityError(f"the server is at capacity ({self.max_waiting} requests waiting); retry shortly")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def run(self, inputs: ProcessedInputs, params: SamplingParams, *, record_logits: bool = False) -> Request:
        """Run one request to its end, waiting for it: the finished Request (``tokens``, ``stats``,
        ``step_logits`` when ``record_logits``). Raises what failed it."""
        handle = self.submit(inputs, params, record_logits=record_logits)
        for _ in handle:
            pass
        return handle.request

    def close(self) -> None:
        """Stop the loop thread (pending requests are failed); the generator may take another scheduler."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if self.generator.scheduler is self:
            self.generator.scheduler = None

    def __enter__(self) -> "BatchScheduler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._prefilling) + len(self._decoding)

    @property
    def cache(self):
        """The KV cache of the generator's persistent decode state."""
        return self.engine.state.cache

    # ----------------------------------------------------------------------------- the driver
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._waiting or self._prefilling or self._decoding):
                    self._wake.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                plan = schedule(self._waiting, self._prefilling, self._decoding, len(self.engine.free_slots),
                                self.max_batch)
                for handle in plan.admit:
                    self.generator.admit(handle.request)
                    self._prefilling.append(self._waiting.popleft())
            if plan.prefill is not None:
                self._prefill(plan.prefill)
            if plan.decode:
                self._decode(list(plan.decode))
        for handle in [*self._waiting, *self._prefilling, *self._decoding]:
            self._fail(handle, RuntimeError("the server is shutting down"))

    def _drop_cancelled(self) -> None:
        for group in (self._waiting, self._prefilling, self._decoding):
            for handle in [h for h in group if h.request.cancel_requested.is_set()]:
                group.remove(handle)
                handle.request.finish("cancelled")
                self._retire(handle)

    def _retire(self, handle: RequestHandle) -> None:
        """A finished request leaves: its slot goes back and its stream ends (with its error, if any)."""
        self.generator.release(handle.request)
        handle.close(handle.request.error)

    def _fail(self, handle: RequestHandle, error: BaseException) -> None:
        for group in (self._waiting, self._prefilling, self._decoding):
            if handle in group:
                group.remove(handle)
        handle.request.finish("error", error)
        self._retire(handle)

    def _emit(self, handle: RequestHandle, piece: str) -> None:
        """Deliver a request's new text; retire it when that was its last token."""
        if piece:
            handle.deliver(piece)
        if handle.request.finished:
            if handle in self._decoding:
                self._decoding.remove(handle)
            self._retire(handle)

    def _prefill(self, handle: RequestHandle) -> None:
        """One prompt chunk of ``handle`` (the front of the prefill queue); its first token once the prompt is in."""
        request = handle.request
        try:
            done = self.generator.prefill_step(request)
            piece = self.generator.sample([request], request.next_logits.unsqueeze(0))[0] if done else ""
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("prefill failed")
            self._fail(handle, err)
            return
        if not done:
            self._prefilling.rotate(-1)  # round robin between long prompts
            return
        self._prefilling.remove(handle)
        if not request.finished:
            self._decoding.append(handle)
        self._emit(handle, piece)

    def _decode(self, batch: list[RequestHandle]) -> None:
        """One decode step for ``batch``; a failed step is rewound and each request stepped alone."""
        try:
            tokens = self.generator.next_tokens([h.request for h in batch])
        except Exception as err:  # noqa: BLE001
            if len(batch) == 1:
                log.exception("decode failed")
                self._fail(batch[0], err)
                return
            log.exception("batched decode step failed; rewinding its %d requests and stepping each alone", len(batch))
            for handle in batch:
                try:
                    self.generator.rewind(handle.request)
                except Exception as rewind_error:  # noqa: BLE001
                    self._fail(handle, rewind_error)
            for handle in [h for h in batch if not h.request.finished]:
                self._decode([handle])
            return
        for handle, token in zip(batch, tokens):
            try:
                piece = self.generator.accept(handle.request, token)
            except Exception as err:  # noqa: BLE001 - its token's bookkeeping is its own
                log.exception("recording a token failed")
                self._fail(handle, err)
                continue
            self._emit(handle, piece)
