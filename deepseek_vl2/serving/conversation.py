"""The rules of a conversation request: the ``messages`` input, the prompt and the images.

``messages`` is an array of turns ``{"role": "system" | "user" | "assistant", "content": ...}``
(sent as JSON, or as a JSON text in a string): an optional leading system message (the same as
the ``system_prompt`` input), then user and assistant turns alternating from a user turn. The
content is a string or a list of OpenAI-style parts (``message_content.py``). The newest user
turn is ``prompt``, or the last turn of ``messages`` when ``prompt`` is left out.

Images: those inside messages (``image_url`` parts with a ``data:`` URI) stay in their place.
The image inputs (``image``, ``image_2``, …) fill the ``<image>`` tags typed in the texts, in
order; with no typed tag they go before the newest user text, one per line (as the official web
demo puts the images sent with a turn). Every rule broken gets a ValueError that says what to
change, raised before any image is decoded or any model work starts. Nothing named in a message
is fetched or opened.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from deepseek_vl2.serving.message_content import IMAGE_TAG, MessageImage, Piece, content_pieces, json_kind

ROLES = ("user", "assistant")
SYSTEM_ROLE = "system"
KEYS = ("role", "content")
# Keys other chat formats use for images: named in the message, so the user learns where images go.
IMAGE_KEYS = ("image", "images", "image_url", "image_urls")
MESSAGES_EXAMPLE = '[{"role": "user", "content": "<image> What is this?"}, {"role": "assistant", "content": "A red square."}]'  # noqa: E501


@dataclass(frozen=True)
class Turn:
    """One checked user or assistant turn: its text and images in order, and where it came from."""

    role: str
    pieces: tuple[Piece, ...]
    where: str  # "messages[2]" or "prompt"

    def typed_tags(self) -> int:
        """``<image>`` tags typed in the text (each takes the next image input)."""
        return sum(piece.count(IMAGE_TAG) for piece in self.pieces if isinstance(piece, str))

    def images(self) -> int:
        """Images sent inside the turn (image parts)."""
        return sum(isinstance(piece, MessageImage) for piece in self.pieces)


@dataclass(frozen=True)
class Messages:
    """The ``messages`` input, checked: its leading system text ("" without one) and its turns."""

    system: str = ""
    turns: tuple[Turn, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """What the engine gets: earlier turns and the newest user text, every image tagged in place,
    the images in tag order as (name, file or bytes), and the system prompt."""

    history: tuple[dict[str, str], ...]
    prompt: str
    images: tuple[tuple[str, Any], ...]
    system_prompt: str


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


def _checked_pieces(where: str, content: Any) -> tuple[Piece, ...]:
    """The content's pieces, text checked for control characters, newlines made LF."""
    pieces = []
    for piece in content_pieces(f"{where}.content", content):
        if isinstance(piece, str):
            _refuse_control_characters(f"{where}.content", piece)
            piece = piece.replace("\r\n", "\n").replace("\r", "\n")
        pieces.append(piece)
    return tuple(pieces)


def _turn(index: int, message: Any) -> Turn:
    """One checked message of the array (a system message comes back with role "system")."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(
            f"{where} must be an object like {{\"role\": \"user\", \"content\": \"...\"}}, "
            f"got {json_kind(message)}"
        )
    extra = [key for key in message if key not in KEYS]
    if extra:
        images = any(key in IMAGE_KEYS for key in extra)
        raise ValueError(
            f"{where} has the key {extra[0]!r}; a turn has only \"role\" and \"content\""
            + (". Images inside messages are never fetched or read: put an image in content as "
               "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}}, or send it as "
               f"image, image_2, … with {IMAGE_TAG} where it goes" if images else "")
        )
    missing = [key for key in KEYS if key not in message]
    if missing:
        raise ValueError(f"{where} lacks {missing[0]!r}; each turn is {{\"role\": ..., \"content\": ...}}")
    role = message["role"]
    if role not in (SYSTEM_ROLE, *ROLES):
        raise ValueError(f"{where}.role must be \"system\", \"user\" or \"assistant\", got {json.dumps(role)}")
    turn = Turn(role, _checked_pieces(where, message["content"]), where)
    if not turn.images() and not "".join(p for p in turn.pieces if isinstance(p, str)).strip():
        raise ValueError(f"{where}.content is empty; write the turn's text")
    if role != "user" and (turn.images() or turn.typed_tags()):
        raise ValueError(f"{where} is {_a(role)} message with an image; images go in user turns only")
    return turn


def _parsed_json(text: str) -> Any:
    """The ``messages`` string parsed as JSON, or a ValueError saying what is wrong."""
    _refuse_control_characters("messages", text)
    try:
        return json.loads(text, strict=False)  # raw tabs and newlines inside strings are fine
    except json.JSONDecodeError as error:
        raise ValueError(
            f"messages is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"send a JSON array such as {MESSAGES_EXAMPLE}"
        ) from None
    except RecursionError:
        raise ValueError("messages is nested too deeply; send a flat JSON array of turns") from None


def parse_messages(value: Any, max_text_chars: int) -> Messages:
    """The ``messages`` input (a list, or a JSON array in a string; blank, None or [] for none),
    checked.

    Raises ValueError naming the first problem and what to change: not JSON, not an array, a turn
    that is not ``{"role", "content"}``, a role other than system/user/assistant, a system
    message after the first, user and assistant turns that do not alternate from a user turn,
    content that is neither text nor parts, empty content, control characters, an image outside
    a user turn, more than `max_text_chars` characters of text.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return Messages()
    parsed = _parsed_json(value) if isinstance(value, str) else value
    if not isinstance(parsed, list):
        raise ValueError(
            f"messages must be a JSON array of turns, got {json_kind(parsed)}; "
            f"for example {MESSAGES_EXAMPLE}"
        )
    turns = [_turn(index, message) for index, message in enumerate(parsed)]
    system = ""
    if turns and turns[0].role == SYSTEM_ROLE:
        system = "".join(turns.pop(0).pieces).strip()  # type: ignore[arg-type]  # text only
    for index, turn in enumerate(turns):
        expected = ROLES[index % 2]
        if turn.role == SYSTEM_ROLE:
            raise ValueError(
                f"{turn.where} is a system message; only the first message may be one "
                "(or use the system_prompt input)"
            )
        if turn.role != expected:
            raise ValueError(
                f"{turn.where} is {_a(turn.role)} turn where {_a(expected)} turn belongs; the turns "
                "must alternate user, assistant, user, … starting with a user turn"
            )
    text_chars = sum(len(p) for turn in turns for p in turn.pieces if isinstance(p, str)) + len(system)
    if text_chars > max_text_chars:
        raise ValueError(
            f"messages holds {text_chars} characters of text; at most {max_text_chars} are accepted "
            "(the model's context holds 4096 tokens in all)"
        )
    return Messages(system, tuple(turns))


def _system_prompt(messages: Messages, system_prompt: str) -> str:
    if messages.system and system_prompt:
        raise ValueError(
            "the system prompt is given twice, in system_prompt and as the first message of "
            "messages; keep one of them"
        )
    return messages.system or system_prompt


def _newest_turn(turns: list[Turn], prompt: str) -> Turn:
    """The newest user turn: `prompt`, or (prompt blank) the last turn of ``messages``, taken off."""
    if prompt.strip():
        if turns and turns[-1].role == "user":
            raise ValueError(
                f"messages ends with a user turn ({turns[-1].where}) and prompt holds a question "
                "too; leave prompt out to answer that turn, or end messages with the assistant's "
                "reply and ask the new question in prompt"
            )
        return Turn("user", (prompt,), "prompt")
    if turns and turns[-1].role == "user":
        return turns.pop()
    raise ValueError(
        "prompt must not be empty: ask something about the image"
        + (", or end messages with the user turn to answer" if turns else "")
    )


def _check_image_count(turns: Sequence[Turn], files: int, max_images: int, where: str) -> None:
    """The typed ``<image>`` tags fit the image inputs; all images together fit the limit."""
    typed = sum(turn.typed_tags() for turn in turns)
    inside = sum(turn.images() for turn in turns)
    if typed > max_images:
        raise ValueError(
            f"{where} has {typed} {IMAGE_TAG} tags but at most {max_images} images fit in one "
            f"request; remove {typed - max_images} or more tags"
        )
    if files + inside > max_images:
        raise ValueError(
            f"the request has {files + inside} images ({files} image input(s), {inside} inside "
            f"messages) but at most {max_images} fit in one request; send fewer images"
        )
    if typed == 0 or typed == files:
        return
    change = (f"add {files - typed} more tag(s) for the images left unused" if typed < files
              else f"remove {typed - files} tag(s) or send more images")
    raise ValueError(
        f"{where} has {typed} {IMAGE_TAG} tag(s) but {files} image(s) were given; put exactly "
        f"one {IMAGE_TAG} tag in the user messages for each image ({change})"
    )


def request_conversation(messages: Messages, prompt: str, system_prompt: str,
                         files: Sequence[tuple[str, Any]], max_images: int) -> Conversation:
    """The request's conversation: `messages`' turns, the newest user turn, the images placed.

    `files` are the image inputs (name, file) in order; `prompt` is the cleaned prompt input
    ("" when left out) and `system_prompt` the stripped system_prompt input.
    """
    system = _system_prompt(messages, system_prompt)
    turns = list(messages.turns)
    newest = _newest_turn(turns, prompt)
    where = "the conversation (messages and prompt)" if turns or newest.where != "prompt" else "the prompt"
    _check_image_count([*turns, newest], len(files), max_images, where)
    if files and not any(turn.typed_tags() for turn in [*turns, newest]):
        newest = Turn(newest.role, (f"{IMAGE_TAG}\n" * len(files), *newest.pieces), newest.where)
    unused = iter(files)
    images: list[tuple[str, Any]] = []
    texts: list[str] = []
    for turn in [*turns, newest]:
        parts = []
        for piece in turn.pieces:
            if isinstance(piece, MessageImage):
                images.append((piece.name, piece.data))
                parts.append(IMAGE_TAG)
            else:
                images.extend(next(unused) for _ in range(piece.count(IMAGE_TAG)))
                parts.append(piece)
        texts.append("".join(parts))
    history = tuple({"role": turn.role, "content": text} for turn, text in zip(turns, texts))
    return Conversation(history, texts[-1], tuple(images), system)
