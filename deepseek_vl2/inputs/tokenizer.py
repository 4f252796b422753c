"""The checkpoint's fast tokenizer: loading it, and adding special tokens on transformers 4.x and 5.x."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the fast tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json).

    Uses the class named in tokenizer_config.json (LlamaTokenizerFast for the real checkpoints)
    and falls back to a plain PreTrainedTokenizerFast.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    tokenizer_class = None
    if config_file.is_file():
        tokenizer_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    if tokenizer_class:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def add_extra_special_token(tokenizer: PreTrainedTokenizerBase, token: str) -> None:
    """Append `token` to the tokenizer's extra special tokens, keeping the ones it has.

    transformers 4.x calls the list ``additional_special_tokens`` and the keep-flag
    ``replace_additional_special_tokens``; 5.x renamed both to ``extra_special_tokens`` /
    ``replace_extra_special_tokens`` (and rejects the old flag). The flag the installed version
    takes is read from the method's signature.
    """
    parameters = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in parameters:  # transformers >= 5
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_additional_special_tokens=False)


def split_on_tokens(text: str, tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Cut `text` at every occurrence of `tokens`: ``(piece, is_token)`` pairs, empty pieces
    dropped. Overlapping matches resolve leftmost-longest, like the tokenizer's own splitting."""
    if not tokens:
        return [(text, False)] if text else []
    pattern = "|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    return [(part, index % 2 == 1) for index, part in enumerate(parts) if part]
