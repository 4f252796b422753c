"""Unit tests of the processor that do not need the reference fixtures.

A small byte-level tokenizer is built in memory (only bos/eos defined), so these tests also cover
the "add missing special tokens" path. Expected token ids are computed by encoding the literal
template text with that tokenizer, independently of the processor's own string building.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tools.checkpoints import CANDIDATE_RESOLUTIONS
from deepseek_vl2.inputs.processor import (
    DeepseekVL2Processor,
    ProcessorSettings,
    build_conversation,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"

# candidate_resolutions of the official processor_config.json
REAL_CANDIDATES = [tuple(size) for size in CANDIDATE_RESOLUTIONS]  # the official 23 layouts

FILL = (127 / 255 - 0.5) / 0.5  # normalised value of the letter-box colour 127


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, plus bos (0) and eos (1)."""
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def processor() -> DeepseekVL2Processor:
    return DeepseekVL2Processor(make_tokenizer(), ProcessorSettings(tuple(REAL_CANDIDATES)))


def enc(proc: DeepseekVL2Processor, text: str) -> list[int]:
    return proc.tokenizer.encode(text, add_special_tokens=False)


def solid(width: int, height: int, color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def chat(*contents: str) -> list[dict[str, str]]:
    """Alternating user/assistant messages; the caller passes the final assistant text too."""
    roles = [USER, ASSISTANT]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


# ============================================================================ pure functions
def test_build_conversation_adds_tags_in_front():
    conv = build_conversation("Describe.", 2)
    assert conv == [
        {"role": USER, "content": "<image>\n<image>\nDescribe."},
        {"role": ASSISTANT, "content": ""},
    ]
    assert build_conversation("Hello", 0)[0]["content"] == "Hello"


def test_build_conversation_keeps_existing_tags():
    prompt = "Compare <image> with <image>."
    assert build_conversation(prompt, 2)[0]["content"] == prompt
    assert build_conversation(prompt, 5)[0]["content"] == prompt  # process() validates the count
    with pytest.raises(ValueError):
        build_conversation("x", -1)


def test_build_conversation_with_earlier_turns():
    history = [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A bar."}]
    assert build_conversation("And this?", 1, history=history) == [  # untagged: the newest turn's
        {"role": USER, "content": "What?"},
        {"role": ASSISTANT, "content": "A bar."},
        {"role": USER, "content": "<image>\nAnd this?"},
        {"role": ASSISTANT, "content": ""},
    ]
    assert history[0]["content"] == "What?"  # the caller's turns are not changed
    tagged = build_conversation("Compare with <image>", 2, history=[{**history[0], "content": "<image>?"},
                                                                    history[1]])
    assert [turn["content"] for turn in tagged] == ["<image>?", "A bar.", "Compare with <image>", ""]


def test_settings_reject_unusable_config():
    with pytest.raises(ValueError, match="candidate_resolutions"):
        ProcessorSettings.from_dict({"candidate_resolutions": []})
    with pytest.raises(ValueError, match="multiple"):
        ProcessorSettings.from_dict({"candidate_resolutions": [[384, 384], [500, 384]]})
    with pytest.raises(ValueError, match="sft_format"):
        ProcessorSettings.from_dict({"candidate_resolutions": [[384, 384]], "sft_format": "plain"})


# ============================================================================ tokenizer set-up


def test_missing_special_tokens_are_added_in_order(processor):
    vocab = processor.tokenizer.get_vocab()
    order = ["<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
             "<|grounding|>", USER, ASSISTANT]  # fmt: skip
    first = len(pre_tokenizers.ByteLevel.alphabet()) + 2
    assert [vocab[t] for t in order] == list(range(first, first + len(order)))
    assert (processor.bos_id, processor.eos_id) == (0, 1)
    assert processor.pad_id == vocab["<｜▁pad▁｜>"]
    assert processor.image_token_id == vocab["<image>"]
    assert enc(processor, "<|ref|>x<|/ref|>") == [vocab["<|ref|>"], enc(processor, "x")[0], vocab["<|/ref|>"]]


# ============================================================================ token layout


def test_text_only(processor):
    out = processor.process(chat("  Write a poem.  ", ""), [])
    assert out.prompt == f"{USER}: Write a poem.\n\n{ASSISTANT}:"
    assert out.input_ids.tolist() == [0] + enc(processor, f"{USER}: Write a poem.\n\n{ASSISTANT}:")
    assert not out.images_seq_mask.any()
    assert out.images.shape == (1, 3, 384, 384) and not out.images.any()
    assert out.images_spatial_crop.tolist() == [[0, 0]]
    assert out.num_image_tokens == []


def test_single_image_layout(processor):
    out = processor.process(chat("<image>\nDescribe.", ""), [solid(1000, 300)])
    n = 813  # 3x1 tiles
    expected = (
        [0] + enc(processor, f"{USER}: ") + [processor.image_token_id] * n
        + enc(processor, f"\nDescribe.\n\n{ASSISTANT}:")
    )  # fmt: skip
    assert out.input_ids.tolist() == expected
    assert out.images_seq_mask.tolist() == [t == processor.image_token_id for t in expected]
    assert out.images_spatial_crop.tolist() == [[3, 1]]
    assert out.num_image_tokens == [n]
    assert out.images.shape == (4, 3, 384, 384) and out.images.dtype == torch.float32


def test_multi_turn_reply_tokenized_alone_with_eos(processor):
    out = processor.process(chat("Hi", " Hello there! ", "Bye", ""), [])
    assert out.prompt == f"{USER}: Hi\n\n{ASSISTANT}: Hello there!{EOS}{USER}: Bye\n\n{ASSISTANT}:"
    expected = (
        [0] + enc(processor, f"{USER}: Hi\n\n{ASSISTANT}:") + enc(processor, "Hello there!") + [1]
        + enc(processor, f"{USER}: Bye\n\n{ASSISTANT}:")
    )  # fmt: skip
    assert out.input_ids.tolist() == expected


def test_non_empty_last_assistant_turn_is_continued(processor):
    out = processor.process(chat("Hi", "The answer is"), [])
    expected = [0] + enc(processor, f"{USER}: Hi\n\n{ASSISTANT}:") + enc(processor, "The answer is")
    assert out.input_ids.tolist() == expected  # its eos is the one dropped


def test_role_aliases(processor):
    aliased = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    a, b = processor.process(aliased, []), processor.process(chat("Hi", ""), [])
    assert torch.equal(a.input_ids, b.input_ids) and a.prompt == b.prompt


def test_system_prompt_changes_only_the_prompt_by_default(processor):
    plain = processor.process(chat("Hi", ""), [])
    with_system = processor.process(chat("Hi", ""), [], system_prompt="You are terse.")
    assert with_system.prompt == f"You are terse.\n\n{USER}: Hi\n\n{ASSISTANT}:"
    assert torch.equal(with_system.input_ids, plain.input_ids)


def test_system_prompt_in_tokens(processor):
    plain = processor.process(chat("<image>Hi", ""), [solid(50, 50)])
    out = processor.process(
        chat("<image>Hi", ""), [solid(50, 50)], system_prompt=" You are terse. ",
        system_prompt_in_tokens=True,
    )  # fmt: skip
    prefix = enc(processor, "You are terse.\n\n")
    assert out.input_ids.tolist() == [0] + prefix + plain.input_ids.tolist()[1:]
    assert out.images_seq_mask.tolist() == [False] * (1 + len(prefix)) + plain.images_seq_mask.tolist()[1:]
    blank = processor.process(chat("Hi", ""), [], system_prompt="  ", system_prompt_in_tokens=True)
    assert torch.equal(blank.input_ids, processor.process(chat("Hi", ""), []).input_ids)
    with pytest.raises(ValueError, match="system prompt"):
        processor.process(chat("Hi", ""), [], system_prompt="<image>", system_prompt_in_tokens=True)


# ============================================================================ tiling


def test_three_or_more_images_use_one_local_tile(processor):
    images = [solid(1000, 300), solid(64, 640, (0, 0, 255)), solid(400, 400, (0, 255, 0))]
    out = processor.process(chat("<image><image>\n<image> Which?", ""), images)
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert out.num_image_tokens == [421] * 3
    assert out.images.shape == (6, 3, 384, 384)
    for k in range(3):  # the single local tile equals the global view
        assert torch.equal(out.images[2 * k], out.images[2 * k + 1])


def test_image_count_of_whole_conversation_decides_tiling(processor):
    # 1 image in the first turn, 2 in the second: 3 in all, so no tiling even for the first one
    conv = chat("<image>What?", "A bar.", "<image><image>And these?", "")
    out = processor.process(conv, [solid(1000, 300), solid(50, 50), solid(60, 60)])
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    two = processor.process(chat("<image>What?", "A bar.", "<image>And this?", ""),
                            [solid(1000, 300), solid(50, 50)])  # fmt: skip
    assert two.images_spatial_crop.tolist() == [[3, 1], [1, 1]]


def test_normalisation_matches_torchvision(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8), "RGB")
    out = processor.process(chat("<image>", ""), [image])
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    reference = transform(ImageOps.pad(image, (384, 384), color=(127, 127, 127)))
    assert torch.equal(out.images[0], reference)
    assert torch.equal(out.images[1], reference)


def test_letterbox_pads_with_127_and_centres(processor):
    # 768x384 red: global view resized to 384x192 and centred (rows 96..287); local 2x1 exact
    out = processor.process(chat("<image>", ""), [solid(768, 384)])
    assert out.images_spatial_crop.tolist() == [[2, 1]]
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    global_view = out.images[0]
    assert torch.allclose(global_view[:, :96], torch.full_like(global_view[:, :96], FILL))
    assert torch.allclose(global_view[:, 288:], torch.full_like(global_view[:, 288:], FILL))
    assert torch.equal(global_view[:, 96:288], red.expand(3, 192, 384))
    assert torch.equal(out.images[1:], red.expand(2, 3, 384, 384))


def test_local_tiles_are_row_major(processor):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR
    image = Image.new("RGB", (768, 768))
    for k, color in enumerate(colors):
        image.paste(color, (384 * (k % 2), 384 * (k // 2), 384 * (k % 2 + 1), 384 * (k // 2 + 1)))
    out = processor.process(chat("<image>", ""), [image])
    assert out.images_spatial_crop.tolist() == [[2, 2]]
    for k, color in enumerate(colors):
        expected = (torch.tensor(color, dtype=torch.float32) / 255 - 0.5) / 0.5
        assert torch.equal(out.images[1 + k], expected.view(3, 1, 1).expand(3, 384, 384))


def test_non_rgb_images_are_converted(processor):
    gray = Image.fromarray(np.arange(200 * 150, dtype=np.uint32).reshape(150, 200).astype(np.uint8), "L")
    a = processor.process(chat("<image>", ""), [gray])
    b = processor.process(chat("<image>", ""), [gray.convert("RGB")])
    assert torch.equal(a.images, b.images)


def test_image_token_budget_without_pixels(processor):
    assert processor.crop_for_image(1000, 300) == (3, 1)
    assert processor.num_image_tokens(1000, 300) == 813
    assert processor.num_image_tokens(1000, 300, num_images=3) == 421
    out = processor.process(chat("<image>x", ""), [solid(1000, 300)])
    assert out.num_image_tokens == [processor.num_image_tokens(1000, 300)]


# ============================================================================ errors


@pytest.mark.parametrize("tags, n_images", [(2, 1), (0, 1), (1, 0), (1, 3)])
def test_image_tag_count_mismatch(processor, tags, n_images):
    conv = chat("<image>" * tags + "Describe.", "")
    with pytest.raises(ValueError, match=rf"{tags} <image> tag\(s\) but {n_images} image\(s\)"):
        processor.process(conv, [solid(40, 40)] * n_images)


@pytest.mark.parametrize(
    "conversation, match",
    [
        ([], "non-empty"),
        ([{"role": "system", "content": "x"}, {"role": ASSISTANT, "content": ""}], "system_prompt"),
        ([{"role": "bot", "content": "x"}, {"role": ASSISTANT, "content": ""}], "unknown message role"),
        ([{"role": USER, "content": "x"}], "end with an assistant message"),
        ([{"role": USER, "content": "x"}, {"role": ASSISTANT, "content": "<image>"}], "assistant messages"),
        ([{"role": USER}, {"role": ASSISTANT, "content": ""}], "'role' and 'content'"),
        ([{"role": USER, "content": 3}, {"role": ASSISTANT, "content": ""}], "must be a string"),
    ],
)
def test_malformed_conversations(processor, conversation, match):
    with pytest.raises(ValueError, match=match):
        processor.process(conversation, [])


def test_non_image_input_is_rejected(processor):
    with pytest.raises(ValueError, match="PIL image"):
        processor.process(chat("<image>", ""), [np.zeros((4, 4, 3), dtype=np.uint8)])
