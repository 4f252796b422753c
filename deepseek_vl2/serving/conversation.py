"""The rules of a conversation request: the ``messages`` input and the ``<image>`` tags.

``messages`` is a JSON array of the earlier turns, ``{"role": "user" | "assistant", "content":
"..."}``, alternating, starting with a user turn and ending with an assistant reply; the
``prompt`` input is the new user turn. The images (``image``, ``image_2``, …) fill the
``<image>`` tags of the whole conversation in order; without any tag they go before the first
user text. Every rule broken gets a ValueError that says what to change, raised before any
image is decoded or any model work starts.

Nothing in a message is fetched or opened: a URL in a message is text like any other.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Optional

IMAGE_TAG = "<image>"
ROLES = ("user", "assistant")
KEYS = ("role", "content")
# Keys other chat formats use for images: named in the message, so the user learns why they are
# not used (images come only from the file inputs).
IMAGE_KEYS = ("image", "images", "image_url", "image_urls")
MESSAGES_EXAMPLE = '[{"role": "user", "content": "<image> What is this?"}, {"role": "assistant", "content": "A red square."}]'  # noqa: E501


def _control_character(text: str) -> Optional[str]:
    """The first control character of `text` (C0 except tab, LF and CR; DEL; C1) or half of a
    surrogate pair, as ``U+XXXX``; None when there is none."""
    for char in text:
        category = unicodedata.category(char)
        if (category == "Cc" and char not in "\t\n\r") or category == "Cs":
            return f"U+{ord(char):04X}"
    return None


def _refuse_control_characters(where: str, text: str) -> None:
    found = _control_character(text)
    if found is not None:
        raise ValueError(
            f"{where} contains the control character {found}; remove it (control characters "
            "and half surrogate pairs are not text)"
        )


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "an object", "a number", "null", …"""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _turn(index: int, message: Any) -> dict[str, str]:
    """One checked turn of the messages array."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(
            f"{where} must be an object like {{\"role\": \"user\", \"content\": \"...\"}}, "
            f"got {_json_kind(message)}"
        )
    extra = [key for key in message if key not in KEYS]
    if extra:
        images = any(key in IMAGE_KEYS for key in extra)
        raise ValueError(
            f"{where} has the key {extra[0]!r}; a turn has only \"role\" and \"content\""
            + (". Images inside messages are never fetched or read: send them as image, "
               f"image_2, … and mark where they go with {IMAGE_TAG}" if images else "")
        )
    missing = [key for key in KEYS if key not in message]
    if missing:
        raise ValueError(f"{where} lacks {missing[0]!r}; each turn is {{\"role\": ..., \"content\": ...}}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        hint = (" (put a system message in the system_prompt input)" if role == "system" else "")
        raise ValueError(f"{where}.role must be \"user\" or \"assistant\", got {json.dumps(role)}{hint}")
    if not isinstance(content, str):
        raise ValueError(
            f"{where}.content must be a string, got {_json_kind(content)}; images go in the "
            f"image inputs (image, image_2, …) and {IMAGE_TAG} marks where each goes"
        )
    _refuse_control_characters(f"{where}.content", content)
    if not content.strip():
        raise ValueError(f"{where}.content is empty; write the turn's text")
    if role == "assistant" and IMAGE_TAG in content:
        raise ValueError(f"{where} is an assistant turn with {IMAGE_TAG}; images go in user turns only")
    return {"role": role, "content": content.replace("\r\n", "\n").replace("\r", "\n")}


def parse_messages(text: str) -> list[dict[str, str]]:
    """The earlier turns in the ``messages`` input (a JSON array), checked; [] for blank text.

    Raises ValueError naming the first problem and what to change: not JSON, not an array, a turn
    that is not ``{"role", "content"}``, a role other than "user"/"assistant", turns that do not
    alternate from a user turn to a final assistant reply, content that is not a non-empty
    string, control characters, ``<image>`` in an assistant turn.
    """
    if not text.strip():
        return []
    _refuse_control_characters("messages", text)
    try:
        parsed = json.loads(text, strict=False)  # raw tabs and newlines inside strings are fine
    except json.JSONDecodeError as error:
        raise ValueError(
            f"messages is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"send a JSON array such as {MESSAGES_EXAMPLE}"
        ) from None
    except RecursionError:
        raise ValueError("messages is nested too deeply; send a flat JSON array of turns") from None
    if not isinstance(parsed, list):
        raise ValueError(
            f"messages must be a JSON array of turns, got {_json_kind(parsed)}; "
            f"for example {MESSAGES_EXAMPLE}"
        )
    turns = [_turn(index, message) for index, message in enumerate(parsed)]
    for index, turn in enumerate(turns):
        expected = ROLES[index % 2]
        if turn["role"] != expected:
            raise ValueError(
                f"messages[{index}] is {_a(turn['role'])} turn where {_a(expected)} turn belongs; "
                "the turns must alternate user, assistant, user, … starting with a user turn"
            )
    if turns and turns[-1]["role"] != "assistant":
        raise ValueError(
            f"messages ends with a user turn (messages[{len(turns) - 1}]); end it with the "
            "assistant's reply: the new question goes in prompt"
        )
    return turns


def check_image_tags(history: Sequence[Mapping[str, str]], prompt: str, num_images: int,
                     max_images: int) -> None:
    """The ``<image>`` tags of the conversation (earlier turns and prompt) fit the images given.

    No tag at all is fine (the images go before the first user text). Otherwise there must be
    exactly one tag per image, and never more tags than ``max_images`` (the image inputs).
    """
    tags = sum(turn["content"].count(IMAGE_TAG) for turn in history) + prompt.count(IMAGE_TAG)
    if tags == 0 or tags == num_images:
        return
    where = "the conversation (messages and prompt)" if history else "the prompt"
    if tags > max_images:
        raise ValueError(
            f"{where} has {tags} {IMAGE_TAG} tags but at most {max_images} images fit in one "
            f"request; remove {tags - max_images} or more tags"
        )
    change = (f"add {num_images - tags} more tag(s) for the images left unused" if tags < num_images
              else f"remove {tags - num_images} tag(s) or send more images")
    raise ValueError(
        f"{where} has {tags} {IMAGE_TAG} tag(s) but {num_images} image(s) were given; put exactly "
        f"one {IMAGE_TAG} tag in the user messages for each image ({change})"
    )
