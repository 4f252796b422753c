"""Reading several engine streams at once, as concurrent clients would (used by the scheduler tests)."""
from __future__ import annotations

import threading
from typing import Sequence

from deepseek_vl2.engine.handle import RequestHandle


def consume_all(handles: Sequence[RequestHandle], timeout: float = 120) -> list[object]:
    """Read every handle in its own thread; each result is its tokens or the exception it raised.

    Fails (AssertionError) when a stream has not ended within ``timeout`` seconds."""
    results: list[object] = [None] * len(handles)

    def read(k: int) -> None:
        try:
            "".join(handles[k])
            results[k] = list(handles[k].request.tokens)
        except Exception as error:  # noqa: BLE001 - the outcome under test
            results[k] = error

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(handles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert all(not thread.is_alive() for thread in threads), "a stream did not end"
    return results
