"""Cog runner for DeepSeek-VL2: a prompt, up to four images and earlier turns in, streamed text out.

Glue only: the inputs are declared here (``cog build`` reads them from this file, statically),
everything else lives in ``deepseek_vl2.serving``. Up to 8 predictions run at once, batched in
one decode step; each streams its text and can be cancelled alone. Details: docs/cog.md.
"""

from typing import Optional, Union

import cog
from cog import BaseRunner, ConcatenateIterator, FieldInfo, Input, Path
from deepseek_vl2.serving.inputs import IMAGE_INPUTS, declared_inputs, validate_inputs
from deepseek_vl2.serving.service import Service

__all__ = ["IMAGE_INPUTS", "Predictor"]

# Input descriptions. `cog build` reads run()'s Input() arguments statically (a tree-sitter
# parser): descriptions and defaults may name a module-level literal of this file, ge/le must be
# number literals. Each range is written once, below; the checks read it from the declaration.
PROMPT_DESCRIPTION = "Question or instruction: the newest user turn, after messages (leave it out when messages ends with the user turn). <image> marks where each image goes (image, image_2, ... in order); without it the images come before this text. Grounding: <|ref|>object<|/ref|> locates an object, <|grounding|> captions with boxes."  # noqa: E501
IMAGE_DESCRIPTION = "Image to ask about: a data: URI or an http(s) URL. Leave it out for a text-only question."  # noqa: E501
IMAGE_3_DESCRIPTION = "Optional third image. With 3 or more images each is seen at 384x384 only (no tiles)."  # noqa: E501
TEMPERATURE_DESCRIPTION = "Randomness. 0 = greedy (always the most likely token); 0.7 or less recommended."  # noqa: E501
TOP_K_DESCRIPTION = "Sample only among the k most likely tokens. 0 = off."
TOP_P_DESCRIPTION = "Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p. 1 = off."  # noqa: E501
REPETITION_PENALTY_DESCRIPTION = "Penalty for tokens already in the prompt or answer. 1 = off. Not applied when temperature is 0."  # noqa: E501
MAX_LENGTH_TOKENS_DESCRIPTION = "Maximum number of tokens to generate (fewer when prompt and images leave less room in the 4096-token context)."  # noqa: E501
STOP_DESCRIPTION = 'Texts that end the answer: comma-separated, e.g. </answer>,### (spaces around commas dropped), or a JSON array of strings kept exactly (spaces, newlines, commas), e.g. ["</answer>", "Q:, A:"].'  # noqa: E501
MESSAGES_DESCRIPTION = 'Optional earlier turns, a JSON array (or that array as text) of {"role": "user" or "assistant", "content": "..."} turns that alternate from a user turn, after an optional {"role": "system", ...} message; prompt is the next user turn, or leave prompt out and end with the user turn. Example: [{"role": "user", "content": "<image> What is this?"}, {"role": "assistant", "content": "A red square."}]. content may be OpenAI-style parts: {"type": "text", "text": "..."} and {"type": "image_url", "image_url": {"url": "data:..."}} (an image in its place). The image inputs fill the <image> tags typed in the texts in order (without tags they go before the newest user text). URLs in messages are never fetched.'  # noqa: E501
SEED_DESCRIPTION = "Random seed for reproducible sampling. Leave empty for a random one (printed in the logs)."  # noqa: E501


class Predictor(BaseRunner):
    """DeepSeek-VL2 behind Cog: setup() loads the model once, run() streams one answer."""

    def setup(self, weights: Optional[str] = None) -> None:
        """Find or download the checkpoint, check GPU memory, load it, warm it up."""
        self.service = Service.start(weights)

    def healthcheck(self) -> bool:
        """Cog's health check: False (UNHEALTHY) once the engine cannot serve predictions."""
        return self.service.healthy()

    @cog.streaming
    @cog.concurrent(max=8)
    async def run(
        self,
        image: Optional[Path] = Input(default=None, description=IMAGE_DESCRIPTION),
        prompt: Optional[str] = Input(default=None, description=PROMPT_DESCRIPTION),
        image_2: Optional[Path] = Input(default=None, description="Optional second image."),
        image_3: Optional[Path] = Input(default=None, description=IMAGE_3_DESCRIPTION),
        image_4: Optional[Path] = Input(default=None, description="Optional fourth image."),
        system_prompt: Optional[str] = Input(
            default=None, description="Optional text placed before the conversation."
        ),
        messages: Optional[Union[str, list[dict]]] = Input(default=None, description=MESSAGES_DESCRIPTION),
        temperature: float = Input(
            default=0.1, ge=0.0, le=2.0, description=TEMPERATURE_DESCRIPTION
        ),
        top_p: float = Input(default=0.9, ge=0.01, le=1.0, description=TOP_P_DESCRIPTION),
        top_k: int = Input(default=0, ge=0, le=1000, description=TOP_K_DESCRIPTION),
        repetition_penalty: float = Input(
            default=1.1, ge=1.0, le=2.0, description=REPETITION_PENALTY_DESCRIPTION
        ),
        max_length_tokens: int = Input(
            default=2048, ge=1, le=4096, description=MAX_LENGTH_TOKENS_DESCRIPTION
        ),
        stop_sequences: Optional[Union[str, list[str]]] = Input(default=None, description=STOP_DESCRIPTION),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description=SEED_DESCRIPTION
        ),
    ) -> ConcatenateIterator[str]:
        """Answer the prompt (about the images, after the earlier turns), streaming the text.

        A coroutine that returns a generator: Cog's server runs up to 8 at once and sends each
        piece as the generator yields it (deepseek_vl2/serving/coglet_bridge.py says why).
        """
        request = validate_inputs(dict(
            image=image, prompt=prompt, image_2=image_2, image_3=image_3, image_4=image_4,
            system_prompt=system_prompt, messages=messages, temperature=temperature, top_p=top_p,
            top_k=top_k, repetition_penalty=repetition_penalty, max_length_tokens=max_length_tokens,
            stop_sequences=stop_sequences, seed=seed,
        ), DECLARED)  # fmt: skip
        return await self.service.answer(request, self.record_metric)


# The ranges and defaults above, for the checks; Cog's server makes a cog.Path only from a
# data: URI or an http(s) URL, so only those are accepted as files.
DECLARED = declared_inputs(Predictor.run, field_type=FieldInfo, uploaded=(Path,))

