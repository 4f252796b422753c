"""The prefix-cache figure: time to first token of a 3-turn conversation with and without it.

One 640x480 image in turn 1, ~20-token user turns, greedy answers (eos ignored) fed back as the
history; each turn's TTFT (the request's own: vision tower and prefill, the processor not
included) is measured without the prefix cache, then with it, on the same generator. The figure
is the larger of turn 2's and turn 3's ratio (with ÷ without). ``tools.benchmark --target-rows
--rows prefix`` reports it as the ``prefix`` row (docs/benchmark.md).
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.sampling import SamplingParams

TURNS = (
    "<image>\nDescribe this picture: what is in it, which colours it has, and what is happening there?",
    "Which of those colours is the brightest one, and where in the picture do you see it?",
    "Now write the same answer again, but only as a short list of single words, please.",
)


def conversation(generator: Generator, image: Image.Image, new_tokens: int) -> list[dict[str, float]]:
    """Run :data:`TURNS` through the generator's scheduler; per turn: TTFT, prompt and reused tokens."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True, stop=())
    tokenizer, history, turns = generator.processor.tokenizer, [], []
    for prompt in TURNS:
        request = generator.scheduler.run(generator.prepare(prompt, [image], history=history), params)
        stats = request.stats
        turns.append({"ttft_seconds": stats.time_to_first_token, "prompt_tokens": stats.prompt_tokens,
                      "cached_tokens": stats.cached_tokens})
        history += [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": tokenizer.decode(request.tokens, skip_special_tokens=True)}]
    return turns


def prefix_cache_figures(generator: Generator, image: Image.Image, new_tokens: int) -> dict[str, Any]:
    """The conversation without, then with the prefix cache (nothing parked before either); the
    per-turn figures and ``ratio``: the larger TTFT ratio (with ÷ without) of turns 2 and 3."""
    cache, enabled = generator.prefix_cache, generator.prefix_cache.enabled
    runs = {}
    try:
        for name, on in (("without", False), ("with", True)):
            cache.enabled = on
            cache.clear()
            runs[name] = conversation(generator, image, new_tokens)
    finally:
        cache.enabled = enabled
        cache.clear()
    ratios = [w["ttft_seconds"] / wo["ttft_seconds"] for w, wo in zip(runs["with"][1:], runs["without"][1:])]
    return {"ratio": max(ratios), "turn_ratios": ratios, **runs}
