"""Incremental detokenisation: generated token ids -> text pieces that are safe to show.

`TextStreamer` turns one request's generated ids into text pieces, one `push` per token, with
these guarantees (`visible ids` = the pushed ids minus hidden special ids and ids the tokenizer
does not have):

* the concatenation of every piece returned by `push` and `finish` equals
  `tokenizer.decode(visible ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`
  cut before the first stop string (the stop string itself is never returned);
* a piece never ends inside a multi-byte UTF-8 character: the text emitted so far is always a
  prefix of the final text, so no U+FFFD is shown for a character whose bytes are still
  arriving (bytes that are invalid UTF-8 for good come out as U+FFFD, exactly as the tokenizer
  decodes them, once later bytes prove them invalid or at `finish`);
* hidden special tokens (bos, eos, pad, <image>, <|User|>, <|Assistant|>, <|grounding|>, ...)
  never appear; the grounding tags <|ref|> <|/ref|> <|det|> <|/det|> do (see `hidden_special_ids`);
* a stop string is never partly emitted: text that could be the start of a stop string is held
  back until it is ruled out; `stopped` turns True when a stop string completes.

Cost per push is O(1) in the length of the generation: only a short window of recent ids is
decoded (the prefix-offset / read-offset technique).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from .non_finite import NON_FINITE_TOKEN, NonFiniteLogitsError

REPLACEMENT_CHAR = "\ufffd"
# Special tokens users need to see: the grounding answer format is built from them.
VISIBLE_SPECIAL_TOKENS = frozenset({"<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"})
# A UTF-8 character has at most 4 bytes: an incomplete one is missing at most 3.
_MAX_INCOMPLETE_BYTES = 3


def hidden_special_ids(tokenizer, visible: Iterable[str] = VISIBLE_SPECIAL_TOKENS) -> set[int]:
    """Ids of the tokenizer's special tokens that streamed text should hide.

    All special tokens (bos, eos, pad, additional specials, added tokens flagged special) except
    those whose text is in `visible` (by default the grounding tags).
    """
    visible = set(visible)
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            ids.add(token_id)
    return {i for i in ids if tokenizer.convert_ids_to_tokens(i) not in visible}


def earliest_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where `text` must be cut: start of the stop-string occurrence that ends first.

    Among occurrences ending at the same place the longest wins. None when no stop occurs.
    """
    best: Optional[tuple[int, int]] = None  # (end, start)
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            candidate = (start + len(stop), start)
            best = candidate if best is None else min(best, candidate)
    return None if best is None else best[1]


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class TextStreamer:
    """Streams one request's generated ids as UTF-8-safe text pieces (see the module docstring).

    tokenizer: a transformers tokenizer (its `decode` and `len()` are used).
    skip_special_ids: ids never shown; None means `hidden_special_ids(tokenizer)`.
    stop: stop strings; generation text is cut before the first one that completes.
    """

    def __init__(
        self, tokenizer, skip_special_ids: Optional[set[int]] = None, stop: Sequence[str] = ()
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._vocab_limit = len(tokenizer)
        if skip_special_ids is None:
            skip_special_ids = hidden_special_ids(tokenizer)
        self._skip = set(skip_special_ids)
        self._stops = tuple(stop)
        self._ids: list[int] = []  # visible ids pushed so far
        self._prefix_offset = 0  # window start: context decoded again for correct joins
        self._read_offset = 0  # ids before this have been turned into text
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._held_text = ""  # decoded text held back because it may start a stop string
        self._text = ""  # everything emitted so far
        self._stopped = False
        self._finished = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has completed; later pushes return ""."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned pieces)."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can be shown now (often "").

        Pass a Python int (take `tokens.tolist()` once per step for the whole batch rather than
        converting GPU tensors one by one). Raises NonFiniteLogitsError for the sampler's
        `NON_FINITE_TOKEN`.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        token_id = int(token_id)
        if token_id == NON_FINITE_TOKEN:  # the sampler found no finite score to choose from
            raise NonFiniteLogitsError()
        if self._stopped or token_id in self._skip or not 0 <= token_id < self._vocab_limit:
            return ""
        self._ids.append(token_id)
        return self._emit(self._through_stops(self._stable_new_text(), final=False))

    def finish(self) -> str:
        """Flush at the end of generation: the rest of the text, tail bytes decoded as-is."""
        if self._finished:
            return ""
        self._finished = True
        if self._stopped:
            return ""
        tail = self._decode(self._ids[self._prefix_offset:])
        new_text = tail[len(self._prefix_text):] if tail.startswith(self._prefix_text) else ""
        self._read_offset = len(self._ids)
        return self._emit(self._through_stops(new_text, final=True))

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _advance(self, new_read_offset: int) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = new_read_offset
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])

    def _stable_new_text(self) -> str:
        """Text of the ids since read_offset that no later id can change ("" if none yet)."""
        full = self._decode(self._ids[self._prefix_offset:])
        if not full.startswith(self._prefix_text):
            return ""
        emitted_length = len(self._prefix_text)
        if not full.endswith(REPLACEMENT_CHAR):
            if len(full) == emitted_length:
                return ""
            self._advance(len(self._ids))
            return full[emitted_length:]
        # The text ends in U+FFFD: maybe a character still missing bytes. Such a character
        # started within the last 3 ids (every visible id carries at least one byte), so the
        # text up to an earlier id is final once it is a prefix of `full`.
        last_safe = len(self._ids) - _MAX_INCOMPLETE_BYTES
        for end in range(last_safe, self._read_offset, -1):
            candidate = self._decode(self._ids[self._prefix_offset:end])
            if len(candidate) > emitted_length and full.startswith(candidate):
                self._advance(end)
                return candidate[emitted_length:]
        return ""

    def _through_stops(self, new_text: str, final: bool) -> str:
        """Apply stop strings to `new_text`: what may be emitted now (held text included)."""
        if not self._stops:
            return new_text
        buffer = self._held_text + new_text
        cut = earliest_stop(buffer, self._stops)
        if cut is not None:
            self._stopped = True
            self._held_text = ""
            return buffer[:cut]
        hold = 0 if final else _stop_prefix_length(buffer, self._stops)
        self._held_text = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold]

    def _emit(self, piece: str) -> str:
        self._text += piece
        return piece
