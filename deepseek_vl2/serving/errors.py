"""Failures turned into messages for the user: allocation failures free memory and say what to
change; an error without a message gets its type named. Input problems pass unchanged."""

from __future__ import annotations

import gc
import traceback
from typing import Optional

import torch

GPU_OUT_OF_MEMORY_MESSAGE = (
    "the GPU ran out of memory during this prediction. Try fewer or smaller images, a shorter "
    "prompt or a smaller max_length_tokens, or retry when the server is less busy"
)
HOST_OUT_OF_MEMORY_MESSAGE = (
    "the server ran out of memory (RAM) during this prediction. Try fewer or smaller images, "
    "a shorter prompt or a smaller max_length_tokens"
)
_HOST_OOM_TEXT = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def out_of_memory_kind(error: BaseException) -> Optional[str]:
    """"gpu" or "host" when `error` (or what caused it) is an allocation failure, else None."""
    for cause in _causes(error):
        if isinstance(cause, torch.OutOfMemoryError) or (
            isinstance(cause, RuntimeError) and "CUDA out of memory" in str(cause)
        ):
            return "gpu"
        if isinstance(cause, MemoryError) or (
            isinstance(cause, RuntimeError) and any(t in str(cause) for t in _HOST_OOM_TEXT)
        ):
            return "host"
    return None


def free_memory(error: Optional[BaseException] = None) -> None:
    """Release what a failed prediction held: the tensors its traceback frames still reference,
    Python garbage, and (on CUDA) the allocator's cached blocks."""
    for cause in _causes(error) if error is not None else []:
        if cause.__traceback__ is not None:
            traceback.clear_frames(cause.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def user_facing_error(error: Exception) -> Exception:
    """The exception a prediction should fail with in place of `error`; the message is for the user.

    Input problems (ValueError: unreadable images, a prompt that does not fit, bad numbers) are
    returned unchanged. An out-of-memory error frees memory (:func:`free_memory`) and becomes a
    RuntimeError saying what to change; an error without a message gets its type named. The
    original is kept as ``__cause__`` (in the server log's traceback). Use it in predict() as
    ``except Exception as error: raise user_facing_error(error)``.
    """
    if isinstance(error, ValueError):
        return error
    kind = out_of_memory_kind(error)
    if kind is not None:
        free_memory(error)
        message = GPU_OUT_OF_MEMORY_MESSAGE if kind == "gpu" else HOST_OUT_OF_MEMORY_MESSAGE
        friendly = RuntimeError(message)
    elif not str(error).strip():
        friendly = RuntimeError(
            f"internal error ({type(error).__name__}) while generating; the server keeps "
            "serving: retry, and report it if it happens again"
        )
    else:
        return error
    friendly.__cause__ = error
    return friendly
