"""DeepSeek-VL2 processor: chat template, image tiling, `<image>` expansion and tokenization.

Reproduces the official ``DeepseekVLV2Processor`` in inference mode (see
docs/inputs.md for the user-facing description):

* token stream: bos, then per user turn ``"<|User|>: " + text + "\\n\\n<|Assistant|>:"``, per
  assistant reply the stripped reply tokenized on its own followed by eos; the final eos (of the
  open assistant turn) is dropped. Text is encoded without automatic special tokens, one piece
  between consecutive ``<image>`` tags at a time, and every tag is replaced by that image's tokens.
* images: a 384×384 global view plus a grid of 384×384 local tiles (letter-boxed with
  ``ImageOps.pad``, fill = mean colour), normalised as ``(x/255 - mean)/std`` in float32.
* special-token strings typed by the caller: with ``user_text_specials="all"`` (the default,
  what the official processor does) every special-token string in the text becomes its special
  id. With ``"structural"`` (what the Cog predictor uses) only ``<image>`` and the grounding
  tags do; role markers, bos/eos/pad and any other special-token string are tokenized as plain
  text, so a user cannot forge turns or end the prompt (see docs/cog.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from .chat_template import (  # build_conversation, GROUNDING_TOKENS: re-exported for callers
    build_conversation,
    ASSISTANT_ROLE,
    CHAT_ROLE_TOKENS,
    GROUNDING_TOKENS,
    SYSTEM_SEPARATOR,
    USER_ROLE,
    PlanItem,
    caller_text_plan,
    format_conversation,
    user_turn_plan,
    validated_turns,
)
from .settings import PROCESSOR_CONFIG_FILE, SUPPORTED_SFT_FORMATS, ProcessorSettings
from .tiling import letterbox, num_image_tokens_for_crop, select_best_resolution
from .tokenizer import add_extra_special_token, load_tokenizer

USER_TEXT_SPECIALS = ("all", "structural")
"""How special-token strings in caller text are tokenized: every one as its id ("all", the
official behaviour) or only `<image>` and the grounding tags ("structural")."""


@dataclass
class ProcessedInputs:
    """Model inputs for one conversation (no batch dimension)."""

    prompt: str  # the sft_format string the reference reports
    input_ids: torch.Tensor  # [T] int64
    images: torch.Tensor  # [n_tiles, 3, S, S] float32; one all-zero tile when there is no image
    images_seq_mask: torch.Tensor  # [T] bool, true at image-token positions
    images_spatial_crop: torch.Tensor  # [n_images, 2] int64 (tiles across, tiles down); [[0, 0]] without image
    num_image_tokens: list[int]  # per image
    earlier_text_tokens: int = 0  # text tokens of the turns before the last user turn


class DeepseekVL2Processor:
    """Turns a chat conversation and its images into DeepSeek-VL2 model inputs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: ProcessorSettings):
        """Wrap `tokenizer`, adding any missing special token (pad, image, grounding, roles)."""
        settings.validate()
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_token = settings.image_token
        self._ensure_special_tokens()
        vocab = tokenizer.get_vocab()
        self.image_token_id: int = vocab[self.image_token]
        self.bos_id: int = self._required_id("bos_token_id")
        self.eos_id: int = self._required_id("eos_token_id")
        self.pad_id: int = self._required_id("pad_token_id")
        channel = lambda values: torch.tensor(values, dtype=torch.float32).view(3, 1, 1)  # noqa: E731
        self._mean, self._std = channel(settings.image_mean), channel(settings.image_std)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DeepseekVL2Processor":
        """Load `processor_config.json` and the tokenizer from a checkpoint directory."""
        path = Path(path)
        config_file = path / PROCESSOR_CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: is {path} a DeepSeek-VL2 checkpoint?")
        settings = ProcessorSettings.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
        return cls(load_tokenizer(path), settings)

    # ----------------------------------------------------------------- tokenizer set-up

    def _ensure_special_tokens(self) -> None:
        """Add the special tokens the official processor relies on when absent, in its order."""
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": self.settings.pad_token})
        known = set(tok.get_vocab())
        for token in (self.image_token, *GROUNDING_TOKENS, *CHAT_ROLE_TOKENS):
            if token not in known:  # one at a time so that new ids follow this order
                add_extra_special_token(tok, token)
                known.add(token)

    def _required_id(self, attribute: str) -> int:
        value = getattr(self.tokenizer, attribute)
        if value is None:
            raise ValueError(f"the tokenizer defines no {attribute.removesuffix('_id')}")
        return int(value)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` without automatic special tokens (special-token strings still map)."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_plain_text(self, text: str) -> list[int]:
        """Token ids of `text` with every special-token string tokenized as ordinary text.

        ``"<|User|>"`` becomes the pieces of its characters, never the role token's id. Text
        without special-token strings gets exactly the ids of :meth:`encode_text`.
        """
        return self._plain_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    @property
    def _plain_tokenizer(self) -> Tokenizer:
        """A private copy of the fast tokenizer's backend that never matches special tokens.

        The copy drops every added token that is special, or is one of the tokens this
        processor treats as special (image, grounding, roles) even where a tokenizer file lists
        it as an ordinary added token; other added tokens stay. It is a copy, not the shared
        tokenizer's ``split_special_tokens`` switch: that switch is state on the shared backend,
        and concurrent encodes from several threads would race on it.
        """
        plain = self.__dict__.get("_plain_backend")
        if plain is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(
                    "user_text_specials='structural' needs a fast tokenizer (tokenizer.json)"
                )
            specials = {*self.tokenizer.all_special_tokens, self.image_token, *GROUNDING_TOKENS,
                        *CHAT_ROLE_TOKENS}
            data = json.loads(backend.to_str())
            data["added_tokens"] = [
                token for token in data.get("added_tokens", [])
                if not token.get("special") and token.get("content") not in specials
            ]
            plain = Tokenizer.from_str(json.dumps(data))
            plain.no_padding()
            plain.no_truncation()
            plain.encode_special_tokens = True
            self.__dict__["_plain_backend"] = plain
        return plain

    # ----------------------------------------------------------------- image geometry

    @property
    def image_size(self) -> int:
        """Side of one square tile in pixels (384)."""
        return self.settings.image_size

    def crop_for_image(self, width: int, height: int, num_images: int = 1) -> tuple[int, int]:
        """(tiles across, tiles down) for a width×height image in a conversation of `num_images`.

        With at most 2 images the best candidate resolution is used; with 3 or more every image
        gets a single local tile.
        """
        if num_images > 2:
            return 1, 1
        best_w, best_h = select_best_resolution(width, height, self.settings.candidate_resolutions)
        return best_w // self.image_size, best_h // self.image_size

    def num_image_tokens_for_crop(self, tiles_across: int, tiles_down: int) -> int:
        """Image tokens for one image with the given local grid (this processor's geometry)."""
        s = self.settings
        return num_image_tokens_for_crop(
            tiles_across, tiles_down, s.image_size, s.patch_size, s.downsample_ratio
        )

    def num_image_tokens(self, width: int, height: int, num_images: int = 1) -> int:
        """Image tokens for a width×height image in a conversation of `num_images` images."""
        return self.num_image_tokens_for_crop(*self.crop_for_image(width, height, num_images))

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> [3, H, W] float32, scaled to [0, 1] and normalised like torchvision."""
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        values = pixels.to(torch.float32).div(255)
        if self.settings.normalize:
            values = values.sub(self._mean).div(self._std)
        return values

    def image_tiles(self, image: Image.Image, crop: tuple[int, int]) -> torch.Tensor:
        """Global view then local tiles (row by row) of one image: [1 + tw·th, 3, S, S] float32."""
        size, fill = self.image_size, self.settings.fill_color
        tiles_across, tiles_down = crop
        global_view = self._to_tensor(letterbox(image, (size, size), fill))  # [3, S, S]
        local_view = letterbox(image, (tiles_across * size, tiles_down * size), fill)
        local = self._to_tensor(local_view)  # [3, th·S, tw·S]
        local = local.view(3, tiles_down, size, tiles_across, size).permute(1, 3, 0, 2, 4)
        local = local.reshape(tiles_down * tiles_across, 3, size, size)
        return torch.cat([global_view.unsqueeze(0), local], dim=0)

    # ----------------------------------------------------------------- the whole conversation

    def process(
        self,
        conversation: Sequence[Mapping[str, Any]],
        images: Sequence[Image.Image] | None = None,
        system_prompt: str = "",
        *,
        system_prompt_in_tokens: bool = False,
        user_text_specials: str = "all",
    ) -> ProcessedInputs:
        """Turn a conversation and its images (in `<image>` tag order) into model inputs.

        `conversation` is a list of ``{"role": "<|User|>" | "<|Assistant|>", "content": str}``
        (``"user"``/``"assistant"`` are accepted too) ending with an assistant turn, normally
        empty (the model writes the reply); a non-empty last assistant turn is continued.

        System prompt: like the official processor, `system_prompt` appears only in the
        returned ``prompt`` string and does not change the tokens. With
        ``system_prompt_in_tokens=True`` a non-empty system prompt (stripped) followed by
        "\\n\\n" is tokenized right after bos, which is where the chat template puts it, so the
        model actually sees it.

        Special-token strings in the messages and the system prompt: with
        ``user_text_specials="all"`` (the official behaviour) each becomes its special id. With
        ``"structural"`` only `<image>` and the grounding tags (``<|ref|>``, ``<|/ref|>``,
        ``<|det|>``, ``<|/det|>``, ``<|grounding|>``) do; everything else, e.g. a typed
        ``<|Assistant|>`` or ``<｜end▁of▁sentence｜>``, is tokenized as plain text. Text without
        such strings gets the same ids either way.

        Raises ValueError when the number of `<image>` tags in the user turns differs from the
        number of images, or when the conversation is malformed.
        """
        if user_text_specials not in USER_TEXT_SPECIALS:
            raise ValueError(
                f"user_text_specials must be one of {USER_TEXT_SPECIALS}, got {user_text_specials!r}"
            )
        structural = user_text_specials == "structural"
        images = list(images or [])
        turns = validated_turns(conversation, self.image_token)
        self._check_image_count(turns, images)
        cropping_images = len(images)

        ids: list[int] = [self.bos_id]
        mask: list[bool] = [False]
        tiles: list[torch.Tensor] = []
        crops: list[tuple[int, int]] = []
        token_counts: list[int] = []
        next_image = 0
        encode = self.encode_plain_text if structural else self.encode_text

        def add_image() -> None:
            nonlocal next_image
            image = images[next_image]
            next_image += 1
            if image.mode != "RGB":
                image = image.convert("RGB")
            crop = self.crop_for_image(image.width, image.height, cropping_images)
            tiles.append(self.image_tiles(image, crop))
            crops.append(crop)
            count = self.num_image_tokens_for_crop(*crop)
            token_counts.append(count)
            ids.extend([self.image_token_id] * count)
            mask.extend([True] * count)

        def add(plan: list[PlanItem]) -> None:
            for kind, value in plan:
                if kind == "image":
                    add_image()
                    continue
                piece = encode(value) if kind == "text" else [self._special_id(value)]
                ids.extend(piece)
                mask.extend([False] * len(piece))

        if system_prompt_in_tokens and system_prompt.strip():
            if self.image_token in system_prompt:
                raise ValueError(
                    f"the system prompt contains {self.image_token}; images can only be "
                    "referenced from user messages"
                )
            add(caller_text_plan(system_prompt.strip() + SYSTEM_SEPARATOR, self.image_token, structural))

        last_user = max((i for i, (role, _) in enumerate(turns) if role == USER_ROLE), default=0)
        turns_start = len(ids)  # after bos and the system prompt
        earlier_text_tokens = 0
        for index, (role, text) in enumerate(turns):
            if index == last_user:
                earlier_text_tokens = len(ids) - turns_start - sum(token_counts)
            if role == ASSISTANT_ROLE:
                add(caller_text_plan(text, self.image_token, structural))
                ids.append(self.eos_id)
                mask.append(False)
            else:
                add(user_turn_plan(text, self.image_token, structural))

        # inference mode: drop the eos that closes the final assistant turn
        ids, mask = ids[:-1], mask[:-1]

        size = self.image_size
        if tiles:
            pixel_tiles = torch.cat(tiles, dim=0)
            spatial_crop = torch.tensor(crops, dtype=torch.long)
        else:
            pixel_tiles = torch.zeros((1, 3, size, size), dtype=torch.float32)
            spatial_crop = torch.zeros((1, 2), dtype=torch.long)
        return ProcessedInputs(
            prompt=format_conversation(
                [{"role": r, "content": t} for r, t in turns], system_prompt=system_prompt
            ),
            input_ids=torch.tensor(ids, dtype=torch.long),
            images=pixel_tiles,
            images_seq_mask=torch.tensor(mask, dtype=torch.bool),
            images_spatial_crop=spatial_crop,
            num_image_tokens=token_counts,
            earlier_text_tokens=earlier_text_tokens,
        )

    def _special_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    # ----------------------------------------------------------------- context length

    def image_token_range(self, num_images: int) -> tuple[int, int]:
        """Fewest and most tokens one image can take in a conversation of `num_images` images."""
        fewest = self.num_image_tokens_for_crop(1, 1)
        if num_images > 2:
            return fewest, fewest
        size = self.image_size
        most = max(
            self.num_image_tokens_for_crop(w // size, h // size)
            for w, h in self.settings.candidate_resolutions
        )
        return fewest, most

    def token_parts(self, inputs: ProcessedInputs) -> str:
        """How a prompt's tokens split, e.g. "2 images: 421 + 1023 tokens; text: 17 tokens"
        (", 12 of them in earlier turns" when the conversation has earlier turns)
        (for the engine's one context-length message, ``Generator.budget``)."""
        image_tokens = list(inputs.num_image_tokens)
        parts = []
        if image_tokens:
            count = len(image_tokens)
            parts.append(
                f"{count} image{'s' if count > 1 else ''}: "
                f"{' + '.join(str(n) for n in image_tokens)} tokens"
            )
        text = f"text: {int(inputs.input_ids.numel()) - sum(image_tokens)} tokens"
        if inputs.earlier_text_tokens:
            text += f", {inputs.earlier_text_tokens} of them in earlier turns"
        parts.append(text)
        return "; ".join(parts)

    def image_token_advice(self) -> str:
        """How many tokens an image takes, for messages about prompts that do not fit."""
        one_tile, most = self.image_token_range(1)
        size = self.image_size
        return (
            f"With 1 or 2 images each image takes {one_tile} to {most} tokens depending on its "
            f"size and shape ({one_tile} when it is at most {size}x{size} pixels); with 3 or more "
            f"images each takes {one_tile}."
        )

    def _check_image_count(self, turns: list[tuple[str, str]], images: list[Image.Image]) -> None:
        tags = sum(text.count(self.image_token) for _, text in turns)
        if tags != len(images):
            raise ValueError(
                f"the prompt has {tags} {self.image_token} tag(s) but {len(images)} image(s) were "
                f"given; put exactly one {self.image_token} tag in the user messages for each image "
                "(add or remove tags, or pass as many images as there are tags)"
            )
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"image {index} is a {type(image).__name__}, expected a PIL image")
            if image.width <= 0 or image.height <= 0:
                raise ValueError(f"image {index} is empty ({image.width}x{image.height})")
