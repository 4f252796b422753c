"""The checks of a prediction's arguments, done once, with messages meant for the user.

The ranges and defaults have one home: the ``Input(...)`` declarations of ``run()`` in
predict.py, because ``cog build`` reads them there statically (its parser takes number literals
for ``ge``/``le`` and nothing else). :func:`declared_inputs` reads those declarations at import
time, so the checks here and the server's HTTP 422 use the same numbers.

Files: Cog's server turns a ``data:`` URI or an ``http(s)`` URL into a ``cog.Path`` (a
downloaded temporary file) and passes any other string on as a plain ``str``. Only values of the
``uploaded`` types predict.py names (``cog.Path``) are accepted, so a client cannot make the
container read its own files. This module does not import Cog: predict.py hands it Cog's types.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from deepseek_vl2.engine.sampling import InvalidSamplingParams, SamplingParams
from deepseek_vl2.serving.conversation import parse_messages, request_conversation
from deepseek_vl2.serving.message_content import MAX_IMAGE_URI_CHARS

IMAGE_INPUTS = ("image", "image_2", "image_3", "image_4")  # order of the images in the prompt
MAX_STOP_SEQUENCES = 16
# A resource guard only: 4096 tokens of any text are far fewer characters than this.
MAX_TEXT_CHARS = 100_000
# messages as a string: its text and up to four images as data: URIs.
MAX_MESSAGES_CHARS = MAX_TEXT_CHARS + len(IMAGE_INPUTS) * MAX_IMAGE_URI_CHARS
# Input name -> SamplingParams field, where they differ.
SAMPLING_FIELDS = {"max_length_tokens": "max_new_tokens"}
INPUT_NAMES = {field: name for name, field in SAMPLING_FIELDS.items()}
_NUMBER_INPUTS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_length_tokens", "seed")

FILE_ORIGIN_MESSAGE = (
    "{name} must be sent as a data: URI or an http(s) URL; paths of files on the server are "
    "not accepted"
)

# C0 control characters other than tab and newline, DEL, and C1 controls: invisible, never
# meaningful in a question, and a common residue of copy-paste. Carriage returns are newlines.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Declarations:
    """What run()'s ``Input()`` declarations say, and the types the checks need to know."""

    defaults: dict[str, Any]
    limits: dict[str, tuple[float, float]]  # input name -> (ge, le)
    field_type: type  # what an Input() declaration is (cog.FieldInfo)
    uploaded: tuple[type, ...]  # file values the server made from data:/http(s) inputs (cog.Path)


@dataclass(frozen=True)
class PredictRequest:
    """Checked arguments, ready for the engine."""

    prompt: str  # the newest user turn: an <image> tag marks where each image goes
    images: list[tuple[str, Path | bytes]]  # (name, file or bytes) in tag order
    system_prompt: str
    params: SamplingParams  # validated; seed None = drawn by the engine
    history: tuple[dict[str, str], ...] = ()  # earlier turns (the messages input), images tagged


def declared_inputs(method: Callable[..., Any], field_type: type,
                    uploaded: tuple[type, ...]) -> Declarations:
    """Defaults and ranges of ``method``'s parameters declared as ``field_type`` (``Input()``)."""
    defaults, limits = {}, {}
    for name, param in inspect.signature(method).parameters.items():
        declared = param.default
        if not isinstance(declared, field_type):
            continue
        defaults[name] = declared.default
        if declared.ge is not None or declared.le is not None:
            limits[name] = (declared.ge, declared.le)
    return Declarations(defaults, limits, field_type, uploaded)


def clean_text(text: str) -> str:
    """User text as the model gets it: CRLF and CR become LF; other C0 controls (except tab
    and LF), DEL and C1 controls are removed; lone UTF-16 surrogates become U+FFFD.

    Everything else is kept as typed: any script (CJK, right-to-left, ...), emoji with their
    zero-width joiners, and special-token strings (the processor decides what they mean).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARACTERS.sub("", text)
    return _LONE_SURROGATES.sub("\ufffd", text)


def _check_length(name: str, value: Any, optional: bool, limit: int = MAX_TEXT_CHARS) -> str:
    """A text input as given (None -> "" when optional), refused when not a string or too long."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(
            f"{name} is {len(value)} characters long; at most {limit} are accepted "
            "(the model's context holds 4096 tokens in all)"
        )
    return value


def _check_text(name: str, value: Any, optional: bool) -> str:
    return clean_text(_check_length(name, value, optional))


def _messages_value(value: Any) -> Any:
    """The messages input as sent: None, a JSON text (length-checked) or a list of turns."""
    if isinstance(value, list) or value is None:
        return value
    if not isinstance(value, str):
        raise ValueError(f"messages must be a JSON array of turns (or that array as text), got {type(value).__name__}")
    return _check_length("messages", value, optional=False, limit=MAX_MESSAGES_CHARS)


def parse_stop_sequences(value: Any) -> tuple[str, ...]:
    """The stop sequences: a list of strings (or a JSON array in a string), kept exactly; or a
    comma-separated string (not starting with "["), each piece without its surrounding spaces."""
    if value is None:
        return ()
    if isinstance(value, str) and not value.lstrip().startswith("["):
        text = clean_text(_check_length("stop_sequences", value, optional=False))
        return _at_most_max_stops(tuple(piece.strip() for piece in text.split(",") if piece.strip()))
    if isinstance(value, str):
        try:
            value = json.loads(_check_length("stop_sequences", value, optional=False))
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(
                'stop_sequences starts with "[", so it is read as a JSON array of strings, but it '
                'is not valid JSON; send e.g. ["###", "\\n\\n"] (a stop sequence starting with "[" '
                'goes inside such an array: ["[END]"])'
            ) from None
    if not isinstance(value, list):
        raise ValueError(f"stop_sequences must be a list of strings or a comma-separated string, "
                         f"got {type(value).__name__}")
    for index, stop in enumerate(value):
        if not isinstance(stop, str) or not stop:
            raise ValueError(f"stop_sequences[{index}] must be a non-empty string, got {stop!r}")
    if sum(map(len, value)) > MAX_TEXT_CHARS:
        raise ValueError(f"stop_sequences holds more than {MAX_TEXT_CHARS} characters")
    return _at_most_max_stops(tuple(value))


def _at_most_max_stops(stops: tuple[str, ...]) -> tuple[str, ...]:
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop_sequences has {len(stops)} entries; at most {MAX_STOP_SEQUENCES}")
    return stops


def check_file(name: str, value: Any, uploaded: tuple[type, ...]) -> Path:
    """A file input as the server delivered it, or ValueError.

    Only an ``uploaded`` value is accepted (``cog.Path``: the file Cog's server downloaded from a
    ``data:`` URI or an ``http(s)`` URL). A plain string (what the server passes for anything
    else) or another kind of path is refused with the same message whether or not such a file
    exists.
    """
    if isinstance(value, uploaded):
        return Path(value)
    if isinstance(value, (str, Path)):
        raise ValueError(FILE_ORIGIN_MESSAGE.format(name=name))
    raise ValueError(f"{name} must be a file (a data: URI or an http(s) URL), got {type(value).__name__}")


def sampling_params(numbers: Mapping[str, Any], stop: tuple[str, ...],
                    limits: Mapping[str, tuple[float, float]]) -> SamplingParams:
    """The request's SamplingParams, made once: the engine's own checks (SamplingParams accepts
    only valid values), then the narrower ``limits`` of run()'s declarations (input name ->
    (ge, le)). ``numbers`` are keyed by input name; a ValueError names the input."""
    try:
        params = SamplingParams(**{SAMPLING_FIELDS.get(name, name): v for name, v in numbers.items()}, stop=stop)
    except InvalidSamplingParams as error:
        raise ValueError(error.named(INPUT_NAMES)) from None
    for name, (low, high) in limits.items():
        given = numbers.get(name)
        if given is not None and not low <= given <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {given!r}")
    return params


def validate_inputs(arguments: Mapping[str, Any], declarations: Declarations) -> PredictRequest:
    """Check every run() argument once; raise ValueError with a message meant for the user.

    Runs inside run(), so the checks hold for direct calls too, not only behind Cog's server
    (which refuses out-of-range values with HTTP 422 first). An argument left out, or still
    holding its ``Input(...)`` declaration (a direct call), takes the declared default.
    """
    given = {
        name: (value.default if isinstance(value, declarations.field_type) else value)
        for name, value in arguments.items()
    }
    value = {**declarations.defaults, **given}.get
    images = [(name, check_file(name, value(name), declarations.uploaded))
              for name in IMAGE_INPUTS if value(name) is not None]
    prompt = _check_text("prompt", value("prompt"), optional=True)
    messages = parse_messages(_messages_value(value("messages")), max_text_chars=MAX_TEXT_CHARS)
    system_prompt = _check_text("system_prompt", value("system_prompt"), optional=True).strip()
    conversation = request_conversation(messages, prompt, system_prompt, images, max_images=len(IMAGE_INPUTS))
    stop = parse_stop_sequences(value("stop_sequences"))
    params = sampling_params({name: value(name) for name in _NUMBER_INPUTS}, stop, declarations.limits)
    return PredictRequest(prompt=conversation.prompt, images=list(conversation.images),
                          system_prompt=conversation.system_prompt, params=params,
                          history=conversation.history)

