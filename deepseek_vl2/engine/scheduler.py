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

Nothing hangs (docs/robustness.md, "Faults inside the engine"): every part of a turn (admitting,
a prompt chunk, the first token, a decode step, recording and emitting text, retiring, logging)
runs guarded, and an exception fails the requests that part concerns while the loop goes on. A
step that runs longer than ``step_timeout`` seconds, or a loop that stopped, is a :meth:`fault`:
every waiting consumer's handle ends with it (handles poll it), :meth:`submit` refuses at once,
and the server reports itself unhealthy.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Generic, Iterable, Optional, Sequence, TypeVar

from deepseek_vl2.inputs.processor import ProcessedInputs
from .config import DEFAULT_MAX_WAITING, DEFAULT_STEP_TIMEOUT_SECONDS, STEP_TIMEOUT_ENV
from .generation import Generator
from .handle import RequestHandle
from .request import Request
from .sampling import SamplingParams

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class CapacityError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineStoppedError(RuntimeError):
    """The scheduler's loop cannot run requests (closed, or stopped by a fault); the message says which."""


class StepTimeoutError(RuntimeError):
    """A step of the loop has made no progress within ``step_timeout`` seconds."""


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
    building another over the same generator. ``step_timeout``: seconds one step may run before
    its requests fail (see the module docstring).
    """

    def __init__(self, generator: Generator, max_batch: Optional[int] = None, max_len: Optional[int] = None,
                 max_waiting: int = DEFAULT_MAX_WAITING,
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_SECONDS) -> None:
        if generator.scheduler is not None:
            raise RuntimeError("this generator already has a running scheduler (it alone hands out the decode "
                               "state's slots); close that one first")
        self.generator = generator
        self.max_batch = max_batch or generator.engine.slots
        self.max_len = max_len or generator.context_length
        self.max_waiting = max_waiting
        self.step_timeout = step_timeout
        generator.reserve(self.max_batch, self.max_len)  # the persistent decode state, grown once if needed
        generator.scheduler = self
        self.engine = generator.engine
        self._waiting: deque[RequestHandle] = deque()
        self._prefilling: deque[RequestHandle] = deque()
        self._decoding: list[RequestHandle] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._stopped_by: Optional[BaseException] = None  # what ended the loop, when it ended by a fault
        self._step: Optional[tuple[str, float]] = None  # the step running now and when it began
        self._thread = threading.Thread(target=self._run, name="dsvl2-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- API
    def submit(self, inputs: ProcessedInputs, params: SamplingParams, *, record_logits: bool = False) -> RequestHandle:
        """Queue a request; a prompt that cannot fit or a full queue raise here, in the caller.

        ``record_logits``: the request keeps the logits each token was chosen from (``step_logits``)."""
        if (fault := self.fault()) is not None:
            raise fault
        request = self.generator.new_request(inputs, params, limit=self.max_len, record_logits=record_logits)
        handle = RequestHandle(request, self.fault)
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

    def fault(self) -> Optional[RuntimeError]:
        """Why the loop cannot serve requests now, or None: closed, stopped by a fault, or stuck in a
        step for longer than ``step_timeout`` seconds. Any thread may ask."""
        if self._stopped_by is not None or (not self._thread.is_alive() and not self._stopping):
            cause = self._stopped_by
            return EngineStoppedError(
                f"the engine stopped after an internal error ({type(cause).__name__}: {cause}); it "
                "cannot run predictions until the server restarts")
        if self._stopping:
            return EngineStoppedError("the engine is closed; it takes no more requests")
        step = self._step
        if step is not None and (elapsed := time.monotonic() - step[1]) > self.step_timeout:
            return StepTimeoutError(
                f"the engine has made no progress for {elapsed:.0f} s in a {step[0]} step (the limit is "
                f"{self.step_timeout:g} s, {STEP_TIMEOUT_ENV}); this prediction was stopped. Retry, and "
                "report it if it happens again")
        return None

    @property
    def healthy(self) -> bool:
        """True while the loop can serve requests (see :meth:`fault`)."""
        return self.fault() is None

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
        try:
            while self._turn():
                pass
        except BaseException as error:  # noqa: BLE001 - the loop cannot go on: say so, end every request
            self._stopped_by = error
            _log_failure("the scheduler's loop stopped; no more requests can run")
        finally:
            reason = self.fault() or EngineStoppedError("the engine is closed; it takes no more requests")
            with self._wake:
                pending = [*self._waiting, *self._prefilling, *self._decoding]
            for handle in pending:
                self._fail(handle, reason)

    def _turn(self) -> bool:
        """One turn of the loop: wait for work, plan, carry the plan out; False once stopping.

        A failure outside the guarded steps (planning, dropping cancelled requests) concerns
        every request the turn holds: they fail and the loop goes on."""
        with self._wake:
            while not self._stopping and not (self._waiting or self._prefilling or self._decoding):
                self._wake.wait()
            if self._stopping:
                return False
        try:
            with self._wake:
                self._drop_cancelled()
                free = len(self.engine.free_slots)
                plan = schedule(self._waiting, self._prefilling, self._decoding, free, self.max_batch)
            for handle in plan.admit:
                self._guarded("admission", [handle], lambda h=handle: self._admit(h))
            if plan.prefill is not None and plan.prefill in self._prefilling:  # its admission may have failed
                self._guarded("prefill", [plan.prefill], lambda: self._prefill(plan.prefill))
            if plan.decode:
                self._guarded("decode", plan.decode, lambda: self._decode(list(plan.decode)))
            if self._waiting and free == 0 and not (plan.admit or plan.prefill or plan.decode):  # nobody can run
                raise EngineStoppedError("no decode-state slot is free and no request holds one: the slots were lost")
        except EngineStoppedError:
            raise
        except Exception as error:  # noqa: BLE001 - fail what the turn holds, keep serving
            _log_failure("a scheduler turn failed; its requests fail")
            with self._wake:
                held = [*self._waiting, *self._prefilling, *self._decoding]
            for handle in held:
                self._fail(handle, error)
        return True

    def _guarded(self, step: str, handles: Iterable[RequestHandle], work: Callable[[], None]) -> None:
        """Run one step of the turn, timed for :meth:`fault`; an exception fails ``handles``."""
        self._step = (step, time.monotonic())
        try:
            work()
        except Exception as error:  # noqa: BLE001 - the step's requests fail, the others go on
            _log_failure(f"{step} failed")
            for handle in handles:
                self._fail(handle, error)
        finally:
            self._step = None

    def _admit(self, handle: RequestHandle) -> None:
        """Give the front waiting request a slot; it prefills from the next turn."""
        with self._wake:
            self._waiting.remove(handle)
        self.generator.admit(handle.request)
        self._prefilling.append(handle)

    def _drop_cancelled(self) -> None:
        for group in (self._waiting, self._prefilling, self._decoding):
            for handle in [h for h in group if h.request.cancel_requested.is_set()]:
                group.remove(handle)
                handle.request.finish("cancelled")
                self._retire(handle)

    def _retire(self, handle: RequestHandle) -> None:
        """A finished request leaves: its slot goes back and its stream ends (with its error, if any).
        The stream ends even when giving the slot back fails (that failure is its error)."""
        error = handle.request.error
        try:
            self.generator.release(handle.request)
        except Exception as release_error:  # noqa: BLE001
            _log_failure("giving a request's slot back failed")
            error = error or release_error
        handle.close(error)

    def _fail(self, handle: RequestHandle, error: BaseException) -> None:
        """End ``handle``'s request with ``error``, wherever it is; never raises."""
        for group in (self._waiting, self._prefilling, self._decoding):
            if handle in group:
                group.remove(handle)
        handle.request.finish("error", error)
        self._retire(handle)

    def _emit(self, handle: RequestHandle, piece: str) -> None:
        """Deliver a request's new text; retire it when that was its last token. A failure here is
        this request's alone."""
        try:
            if piece:
                handle.deliver(piece)
            if handle.request.finished:
                if handle in self._decoding:
                    self._decoding.remove(handle)
                self._retire(handle)
        except Exception as error:  # noqa: BLE001
            _log_failure("emitting text failed")
            self._fail(handle, error)

    def _prefill(self, handle: RequestHandle) -> None:
        """One prompt chunk of ``handle`` (the front of the prefill queue); its first token once the prompt is in."""
        request = handle.request
        try:
            done = self.generator.prefill_step(request)
            piece = self.generator.sample([request], request.next_logits.unsqueeze(0))[0] if done else ""
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            _log_failure("prefill failed")
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
                _log_failure("decode failed")
                self._fail(batch[0], err)
                return
            _log_failure(f"batched decode step failed; rewinding its {len(batch)} requests and stepping each alone")
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
                _log_failure("recording a token failed")
                self._fail(handle, err)
                continue
            self._emit(handle, piece)


def _log_failure(message: str) -> None:
    """Log ``message`` with the exception being handled; a failing log handler cannot stop the loop."""
    try:
        log.exception(message)
    except Exception:  # noqa: BLE001 - logging is best effort here
        pass
