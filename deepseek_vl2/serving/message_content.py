"""The content of one turn of ``messages``: a string, or a list of OpenAI-style parts.

A part is ``{"type": "text", "text": "..."}`` or ``{"type": "image_url", "image_url": {"url":
"data:..."}}`` (``image_url`` may also be the URL string itself). The parts become one text,
joined by a newline, each image part written as an ``<image>`` tag in its place; so
``[image, text]`` reads ``"<image>\\n" + text``, the layout of the official processor. An image
part must hold the image itself as a ``data:`` URI: an http(s) URL is refused, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

IMAGE_TAG = "<image>"
PART_SEPARATOR = "\n"
# A resource guard: a 15 MB image file as base64 is 20 million characters.
MAX_IMAGE_URI_CHARS = 20_000_000
PART_EXAMPLE = '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'


@dataclass(frozen=True)
class MessageImage:
    """An image sent inside a message; ``name`` says where (``messages[0].content[1]``)."""

    name: str
    data: bytes


Piece = Union[str, MessageImage]  # the pieces of a turn's text, in order


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "an object", "a number", "null", …"""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def content_pieces(where: str, content: Any) -> tuple[Piece, ...]:
    """A turn's ``content`` (a string or a list of parts) as text and images, in order.

    Text parts and image parts alternate with ``PART_SEPARATOR`` between them. Raises
    ValueError naming the part (``messages[0].content[1]``) and what to change.
    """
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list):
        raise ValueError(
            f"{where} must be a string or a list of parts, got {json_kind(content)}; for example "
            f'[{{"type": "text", "text": "What is this?"}}, {PART_EXAMPLE}]'
        )
    pieces: list[Piece] = []
    for index, part in enumerate(content):
        if pieces:
            pieces.append(PART_SEPARATOR)
        pieces.append(_part(f"{where}[{index}]", part))
    return tuple(pieces)


def _part(where: str, part: Any) -> Piece:
    """One content part: its text, or its image."""
    if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
        raise ValueError(
            f'{where} must be an object with a "type": {{"type": "text", "text": "..."}} or {PART_EXAMPLE}'
        )
    kind = part["type"]
    if kind == "text":
        _only_keys(where, part, ("type", "text"))
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}.text must be a string, got {json_kind(text)}")
        return text
    if kind == "image_url":
        _only_keys(where, part, ("type", "image_url"))
        image = part.get("image_url")
        if isinstance(image, Mapping):
            _only_keys(f"{where}.image_url", image, ("url", "detail"))
            image = image.get("url")
        if not isinstance(image, str):
            raise ValueError(f'{where}.image_url must be {{"url": "data:..."}}, got {json_kind(image)}')
        return MessageImage(where, decode_data_uri(f"{where}.image_url", image))
    raise ValueError(f'{where} has the type {kind!r}; a part is of type "text" or "image_url"')


def _only_keys(where: str, part: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    extra = [key for key in part if key not in keys]
    if extra:
        listed = ", ".join(f'"{key}"' for key in keys)
        raise ValueError(f"{where} has the key {extra[0]!r}; it holds only {listed}")


def decode_data_uri(where: str, uri: str) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded); ValueError for anything else.

    An http(s) URL is refused without being opened: images in messages travel inside them.
    """
    scheme = uri.split(":", 1)[0].strip().lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        raise ValueError(
            f"{where} is an {scheme} URL; images inside messages are never fetched. Put the image "
            "in the message as a data: URI, or send it as image, image_2, … (those inputs take "
            f"http(s) URLs) with {IMAGE_TAG} where it goes"
        )
    if scheme != "data" or "," not in uri:
        raise ValueError(f"{where} must be a data: URI such as data:image/png;base64,…")
    if len(uri) > MAX_IMAGE_URI_CHARS:
        raise ValueError(f"{where} is {len(uri)} characters long; at most {MAX_IMAGE_URI_CHARS} are accepted")
    header, payload = uri.split(",", 1)
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where} is not valid base64 after its comma") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ValueError(f"{where} holds no data; put the image's bytes after the comma")
    return data
