"""The "deepseek" chat template of DeepSeek-VL2 (conversation -> prompt text).

A turn is ``role + ": " + text + separator``; the separator alternates with the position of the
message in the list: "\\n\\n" after even positions (user turns), the eos string after odd ones
(assistant turns). A message with empty text is written as ``role + ":"`` with no separator, which
is how the open assistant turn at the end of a prompt looks. A non-empty system prompt comes
first, followed by "\\n\\n".

Two different texts come out of a conversation, exactly as in the official processor:

* :func:`format_conversation` — the whole conversation as one string (the ``sft_format`` the
  reference reports). It is *not* what gets tokenized in multi-turn chats.
* :func:`format_user_turn` — the text that is tokenized for one user turn
  (``"<|User|>: " + text + "\\n\\n<|Assistant|>:"``); assistant replies are tokenized on their own
  (see ``processor.py``).

:func:`build_conversation` makes the conversation of one request: the earlier turns, the new
user prompt and the open assistant turn, with the images' tags placed. :func:`validated_turns`
checks a conversation's structure; the tokenization plans (:func:`user_turn_plan`,
:func:`caller_text_plan`) cut a turn into the text, special tokens and images the processor
encodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import split_on_tokens

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
CHAT_ROLE_TOKENS = (USER_ROLE, ASSISTANT_ROLE)
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
USER_SEPARATOR = "\n\n"
ASSISTANT_SEPARATOR = "<｜end▁of▁sentence｜>"  # the template's eos string (sep2)
SYSTEM_SEPARATOR = USER_SEPARATOR

# Role names accepted in a conversation, mapped to the template's role tokens.
ROLE_ALIASES = {
    USER_ROLE: USER_ROLE,
    "user": USER_ROLE,
    ASSISTANT_ROLE: ASSISTANT_ROLE,
    "assistant": ASSISTANT_ROLE,
}


def normalize_role(role: object) -> str:
    """Map a message role ("<|User|>", "user", "<|Assistant|>", "assistant") to its role token.

    Raises ValueError for any other role (system prompts go in the ``system_prompt`` argument).
    """
    if isinstance(role, str) and role in ROLE_ALIASES:
        return ROLE_ALIASES[role]
    if role == "system":
        raise ValueError(
            "system messages are not supported inside the conversation; pass the text as the "
            "system_prompt argument instead"
        )
    raise ValueError(
        f"unknown message role {role!r}; use '{USER_ROLE}' (or 'user') and "
        f"'{ASSISTANT_ROLE}' (or 'assistant')"
    )


def render_turns(turns: Sequence[tuple[str, str]], system_prompt: str = "") -> str:
    """Render (role, text) pairs with the deepseek separator style, system prompt first."""
    parts = [system_prompt + SYSTEM_SEPARATOR] if system_prompt else []
    separators = (USER_SEPARATOR, ASSISTANT_SEPARATOR)
    for index, (role, text) in enumerate(turns):
        if text:
            parts.append(f"{role}: {text}{separators[index % 2]}")
        else:
            parts.append(f"{role}:")
    return "".join(parts)


def format_conversation(conversation: Sequence[Mapping[str, str]], system_prompt: str = "") -> str:
    """The prompt string the reference reports: all turns (texts stripped), then stripped."""
    turns = [(normalize_role(m["role"]), str(m["content"]).strip()) for m in conversation]
    return render_turns(turns, system_prompt).strip()


def format_user_turn(text: str) -> str:
    """The text tokenized for one user turn: the user message followed by the open assistant role."""
    return render_turns([(USER_ROLE, text.strip()), (ASSISTANT_ROLE, "")])


def user_turn_segments(text: str) -> list[tuple[str, bool]]:
    """:func:`format_user_turn` cut into ``(piece, from_user)`` pieces, in order.

    The stripped user text is the one piece with ``from_user`` true; the template around it (role
    tokens, ": ", the separator) makes up the others. Joined, the pieces equal
    ``format_user_turn(text)``. The processor uses this to treat special-token strings inside the
    user's text differently from the template's own role tokens.
    """
    text = text.strip()
    if not text:
        return [(f"{USER_ROLE}:", False), (f"{ASSISTANT_ROLE}:", False)]
    return [(f"{USER_ROLE}: ", False), (text, True), (f"{USER_SEPARATOR}{ASSISTANT_ROLE}:", False)]


def build_conversation(
    prompt: str,
    num_images: int,
    image_token: str = "<image>",
    history: Sequence[Mapping[str, str]] = (),
) -> list[dict[str, str]]:
    """The conversation for `prompt` after the earlier turns `history`, ready for
    `DeepseekVL2Processor.process`.

    `history` holds the earlier turns (``{"role": ..., "content": ...}``, starting with a user
    turn, alternating, ending with an assistant reply); `prompt` is the new user turn and an
    open assistant turn follows it. Without any `<image>` tag in the whole conversation,
    `num_images` tags (each followed by a newline) are put in front of the newest user text,
    `prompt` (as the official web demo does for the images sent with a turn); with tags, every
    turn is kept as is (process() checks the count). The earlier turns are never changed, so
    the same earlier turns always give the same leading tokens.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    turns = [{"role": normalize_role(m["role"]), "content": m["content"]} for m in history]
    if not any(image_token in turn["content"] for turn in turns) and image_token not in prompt:
        prompt = f"{image_token}\n" * num_images + prompt
    return [*turns, {"role": USER_ROLE, "content": prompt}, {"role": ASSISTANT_ROLE, "content": ""}]


def validated_turns(conversation: Sequence[Mapping[str, Any]], image_token: str) -> list[tuple[str, str]]:
    """(role token, stripped text) per message, checking roles and structure."""
    if isinstance(conversation, (str, bytes)) or not conversation:
        raise ValueError(
            "conversation must be a non-empty list of {'role': ..., 'content': ...} messages"
        )
    turns = []
    for index, message in enumerate(conversation):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content' keys")
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {index}: 'content' must be a string, got {type(content).__name__}")
        role = normalize_role(message["role"])
        if role == ASSISTANT_ROLE and image_token in content:
            raise ValueError(
                f"message {index}: assistant messages cannot contain {image_token}; "
                "put image tags in user messages"
            )
        turns.append((role, content.strip()))
    if turns[-1][0] != ASSISTANT_ROLE:
        raise ValueError(
            "the conversation must end with an assistant message; append "
            f"{{'role': '{ASSISTANT_ROLE}', 'content': ''}} to ask the model for a reply"
        )
    return turns


# ----------------------------------------------------------------- tokenization plans
# One item of a plan: ("text", s) is encoded, ("special", token) is that token's id,
# ("image", tag) is the next image's tokens.
PlanItem = tuple[str, str]


def user_turn_plan(text: str, image_token: str, structural: bool) -> list[PlanItem]:
    """One user turn (template included) as text / special / image items, in order.

    Not structural: the template text cut at `<image>` only; the tokenizer maps every other
    special-token string itself (the official behaviour). Structural: the template's role
    tokens and the user's `<image>` and grounding tags are items of their own, and the text
    between them (user text and template text together, as the tokenizer would see it) is
    encoded with special-token matching off.
    """
    if not structural:
        plan: list[PlanItem] = []
        for index, piece in enumerate(format_user_turn(text).split(image_token)):
            if index:
                plan.append(("image", image_token))
            plan.append(("text", piece))
        return plan
    pieces = []
    for segment, from_user in user_turn_segments(text):
        markers = (image_token, *GROUNDING_TOKENS) if from_user else CHAT_ROLE_TOKENS
        pieces.extend(split_on_tokens(segment, markers))
    return _merge_text(pieces, image_token)


def caller_text_plan(text: str, image_token: str, structural: bool) -> list[PlanItem]:
    """An assistant reply or system prompt: one text item, or (structural) text items between
    grounding tags."""
    if not structural:
        return [("text", text)]
    return _merge_text(split_on_tokens(text, GROUNDING_TOKENS), image_token)


def _merge_text(pieces: list[tuple[str, bool]], image_token: str) -> list[PlanItem]:
    """Join neighbouring text pieces (the tokenizer only splits text at special tokens)."""
    plan: list[PlanItem] = []
    for piece, is_token in pieces:
        if is_token:
            plan.append(("image" if piece == image_token else "special", piece))
        elif plan and plan[-1][0] == "text":
            plan[-1] = ("text", plan[-1][1] + piece)
        else:
            plan.append(("text", piece))
    return plan
