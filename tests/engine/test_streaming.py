"""Tests for deepseek_vl2.engine.streaming.TextStreamer.

Most tests use a small byte-level BPE tokenizer trained here on ASCII text, so every non-ASCII
character is split into one token per UTF-8 byte; the fixture tokenizer is used where present.
"""

from __future__ import annotations

import json
import random

import pytest

from deepseek_vl2.engine.streaming import TextStreamer, earliest_stop, hidden_special_ids
from tools.parity.reference_data import (
    checkpoint_dir,
    reference_available,
    reference_dir,
    requires_reference,
    skip_reason,
)

REPLACEMENT = "\ufffd"
HIDDEN = ["<eos>", "<pad>", "<image>", "<|User|>", "<|Assistant|>"]
GROUNDING = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"]
MULTIBYTE_TEXTS = [
    "héllo wörld",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 flag 🇫🇷",
    "mixed: the cat 猫 sat on the mat 🐈 — “quotes” …",
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE (transformers fast tokenizer) that knows almost no non-ASCII merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=HIDDEN + GROUNDING, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. The cat sat on the mat. " * 3,
              "hello world, this is a test of a tokenizer with ascii text 123 456 [[1, 2]]."] * 20
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=HIDDEN[2:] + GROUNDING)


@pytest.fixture(scope="module")
def byte_ids(tokenizer):
    """Token id of each single byte value."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # in transformers 4 and 5

    return {byte: tokenizer.convert_tokens_to_ids(char)
            for byte, char in bytes_to_unicode().items()}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids, **kwargs) -> tuple[list[str], TextStreamer]:
    """Push every id, then finish; returns all pieces (the last one from finish)."""
    streamer = TextStreamer(tokenizer, **kwargs)
    pieces = [streamer.push(token_id) for token_id in ids]
    pieces.append(streamer.finish())
    return pieces, streamer


def visible_decode(tokenizer, ids, hidden: set[int]) -> str:
    visible = [i for i in ids if i not in hidden and 0 <= i < len(tokenizer)]
    return tokenizer.decode(visible, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_at_first_stop(text: str, stops) -> str:
    """Brute force: cut before the stop string that completes first (longest on a tie)."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


# ----------------------------------------------------------------------------- UTF-8 safety


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_text_round_trips_without_replacement_chars(tokenizer, text):
    ids = encode(tokenizer, text)
    # The tokenizer really splits characters: some single tokens decode to U+FFFD.
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in piece for piece in pieces)


def test_a_character_is_emitted_only_when_its_last_byte_arrives(tokenizer, byte_ids):
    streamer = TextStreamer(tokenizer)
    emoji = "😀".encode()
    assert [streamer.push(byte_ids[b]) for b in emoji] == ["", "", "", "😀"]


def test_emitted_text_is_always_a_prefix_of_the_final_text(tokenizer, byte_ids):
    """Random byte soup, valid and invalid UTF-8: nothing emitted is ever revised."""
    rng = random.Random(7)
    interesting = ([0x41, 0x20, 0x7A] + list(range(0x80, 0xC0, 7)) + [0xC3, 0xE4, 0xE6, 0xF0, 0xF4]
                   + [0xFF, 0xC0])
    for _ in range(200):
        ids = [byte_ids[rng.choice(interesting)] if rng.random() < 0.85
               else rng.randrange(len(tokenizer) + 20) for _ in range(rng.randint(1, 40))]
        final = visible_decode(tokenizer, ids, hidden_special_ids(tokenizer))
        streamer, emitted = TextStreamer(tokenizer), ""
        for token_id in ids:
            emitted += streamer.push(token_id)
            assert final.startswith(emitted), (ids, emitted, final)
        assert emitted + streamer.finish() == final == streamer.text


def test_invalid_bytes_do_not_stall_the_stream(tokenizer, byte_ids):
    """Orphan continuation bytes are final U+FFFDs: they come out without waiting for finish."""
    streamer = TextStreamer(tokenizer)
    emitted = "".join(streamer.push(byte_ids[0x80]) for _ in range(10))
    assert emitted.startswith(REPLACEMENT * 6)
    assert emitted + streamer.finish() == tokenizer.decode([byte_ids[0x80]] * 10)


def test_finish_emits_an_incomplete_tail_as_the_tokenizer_decodes_it(tokenizer, byte_ids):
    ids = [byte_ids[b] for b in "a中".encode()[:-1]]  # "a" + first 2 of the 3 bytes of 中
    streamer = TextStreamer(tokenizer)
    assert "".join(streamer.push(i) for i in ids) == "a"
    assert streamer.finish() == tokenizer.decode(ids)[1:] == REPLACEMENT


# ----------------------------------------------------------------------------- special tokens


def test_special_tokens_are_hidden_and_grounding_tags_shown(tokenizer):
    answer = "<|ref|>the cat<|/ref|><|det|>[[12, 34, 560, 780]]<|/det|>"
    ids = (encode(tokenizer, "<|Assistant|><image>") + encode(tokenizer, answer)
           + encode(tokenizer, "<pad><|User|> 中<eos>"))
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == answer + " 中"
    for token in HIDDEN:
        assert not any(token in piece for piece in pieces)
    hidden = hidden_special_ids(tokenizer)
    assert {tokenizer.convert_ids_to_tokens(i) for i in hidden} == set(HIDDEN)


def test_hidden_special_token_between_the_bytes_of_a_character(tokenizer, byte_ids):
    pad = tokenizer.convert_tokens_to_ids("<pad>")
    first, second, third = "中".encode()
    pieces, _ = stream(tokenizer, [byte_ids[first], pad, byte_ids[second], byte_ids[third]])
    assert "".join(pieces) == "中"


def test_explicit_skip_ids_override_the_default(tokenizer):
    ref = tokenizer.convert_tokens_to_ids("<|ref|>")
    ids = encode(tokenizer, "<|ref|>cat<|/ref|>")
    pieces, _ = stream(tokenizer, ids, skip_special_ids={ref})
    assert "".join(pieces) == "cat<|/ref|>"


def test_out_of_range_ids_are_empty_text(tokenizer):
    """Ids the tokenizer lacks give no text (-1 is the sampler's NaN mark: tests/engine/test_non_finite_scores.py)."""
    ids = encode(tokenizer, "the cat")
    noisy = [len(tokenizer)] + ids[:1] + [10**6, -2] + ids[1:] + [len(tokenizer) + 31]
    pieces, _ = stream(tokenizer, noisy)
    assert "".join(pieces) == "the cat"


# ----------------------------------------------------------------------------- stop strings


def chars_as_tokens(tokenizer, byte_ids, text: str) -> list[int]:
    """One token per byte, so every stop string spans several tokens."""
    return [byte_ids[b] for b in text.encode()]


@pytest.mark.parametrize(
    "text, stops",
    [("the answer is 42 STOP and more", ["STOP"]),
     ("abc###def", ["###"]),
     ("one two three", ["three", "two"]),          # whichever completes first
     ("xabcdy", ["abcd", "bc"]),                    # "bc" completes first, so it wins
     ("the quick fox", ["quick", "ui"]),            # both inside one token: "ui" ends first
     ("xabcy", ["bc", "abc"]),                      # same end: the longer one wins
     ("café 😀 end", ["😀"]),                        # multi-byte stop string
     ("no stop here", ["zzz"]),
     ("almost <EN but then <END> after", ["<END>"]),
     ("<ST<STOP", ["<STOP"])],
)
def test_stop_strings_cut_the_text(tokenizer, byte_ids, text, stops):
    for ids in (encode(tokenizer, text), chars_as_tokens(tokenizer, byte_ids, text)):
        pieces, streamer = stream(tokenizer, ids, stop=stops)
        expected = cut_at_first_stop(text, stops)
        assert "".join(pieces) == expected
        assert streamer.stopped == (expected != text)
        emitted = ""
        for piece in pieces:  # no piece ever shows part of a stop string
            emitted += piece
            assert expected.startswith(emitted)


def test_earliest_stop():
    assert earliest_stop("a two three", ["three", "two"]) == 2
    assert earliest_stop("xabcy", ["bc", "abc"]) == 1
    assert earliest_stop("nothing", ["zz"]) is None


def test_a_false_partial_match_is_held_then_released(tokenizer, byte_ids):
    streamer = TextStreamer(tokenizer, stop=["<END>"])
    pushed = [streamer.push(i) for i in chars_as_tokens(tokenizer, byte_ids, "a <EN")]
    assert "".join(pushed) == "a "  # "<EN" may start the stop string: held back
    assert "".join(streamer.push(i) for i in chars_as_tokens(tokenizer, byte_ids, "D!")) == "<END!"
    assert not streamer.stopped
    assert streamer.push(encode(tokenizer, "x")[0]) == "x"


def test_held_partial_match_is_flushed_at_finish(tokenizer, byte_ids):
    pieces, streamer = stream(tokenizer, chars_as_tokens(tokenizer, byte_ids, "bye <EN"),
                              stop=["<END>"])
    assert pieces[-1] == "<EN" and "".join(pieces) == "bye <EN" and not streamer.stopped


def test_nothing_is_emitted_after_a_stop(tokenizer):
    streamer = TextStreamer(tokenizer, stop=["cat"])
    ids = encode(tokenizer, "the cat sat on the mat")
    pieces, stopped_after = [], []
    for token_id in ids:
        pieces.append(streamer.push(token_id))
        stopped_after.append(streamer.stopped)
    first_stopped = stopped_after.index(True)
    assert "".join(pieces[:first_stopped + 1]) == "the "
    assert pieces[first_stopped + 1:] == [""] * (len(ids) - first_stopped - 1)
    assert streamer.finish() == "" and streamer.text == "the "


def test_stop_string_inside_one_token(tokenizer):
    ids = encode(tokenizer, "the cat")
    assert "".join(stream(tokenizer, ids, stop=["a"])[0]) == "the c"


def test_rejects_empty_stop_strings(tokenizer):
    with pytest.raises(ValueError):
        TextStreamer(tokenizer, stop=[""])


# ----------------------------------------------------------------------------- cost


def test_each_push_decodes_only_a_short_window(tokenizer, monkeypatch):
    lengths = []
    decode = tokenizer.decode

    def counting_decode(ids, **kwargs):
        lengths.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    ids = encode(tokenizer, " ".join(MULTIBYTE_TEXTS) * 10)
    assert len(ids) > 500
    pieces, _ = stream(tokenizer, ids)
    assert max(lengths) <= 8
    assert len(lengths) <= 3 * len(ids)
    monkeypatch.undo()
    assert "".join(pieces) == " ".join(MULTIBYTE_TEXTS) * 10


# ----------------------------------------------------------------------------- fixture tokenizer

@pytest.fixture(scope="module")
def fixture_tokenizer():
    if not reference_available():
        pytest.skip(skip_reason())
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir("tiny")))


@requires_reference
def test_fixture_tokenizer_hides_the_documented_special_tokens(fixture_tokenizer):
    # README: 0 bos, 1 eos, 2 pad, 1400 <image>, 1401-1404 grounding tags, 1405 <|grounding|>,
    # 1406 <|User|>, 1407 <|Assistant|>.
    assert hidden_special_ids(fixture_tokenizer) == {0, 1, 2, 1400, 1405, 1406, 1407}


@requires_reference
def test_fixture_tokenizer_round_trip(fixture_tokenizer):
    text = ("<|ref|>the red square<|/ref|><|det|>[[120, 45, 600, 999]]<|/det|> 中文 😀👍🏽 "
            "naïve café, 日本語")
    ids = [0, 1407] + encode(fixture_tokenizer, text) + [1439, 1, 2]
    pieces, _ = stream(fixture_tokenizer, ids, stop=["999]]"])
    assert "".join(pieces) == cut_at_first_stop(text, ["999]]"])
    pieces, _ = stream(fixture_tokenizer, ids)
    assert "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces)


@requires_reference
def test_reference_generations_stream_to_their_decoded_text(fixture_tokenizer):
    """The reference runs' generated ids (random weights: stray bytes, eos) stream consistently."""
    hidden = hidden_special_ids(fixture_tokenizer)
    files = sorted((reference_dir() / "outputs").glob("*/*.json"))
    assert files
    for path in files:
        meta = json.loads(path.read_text(encoding="utf-8"))
        for run in ("greedy", "greedy_repetition_penalty_1.1"):
            ids = meta[run]["new_tokens"]
            final = visible_decode(fixture_tokenizer, ids, hidden)
            streamer, emitted = TextStreamer(fixture_tokenizer), ""
            for token_id in ids:
                emitted += streamer.push(token_id)
                assert final.startswith(emitted), path
            assert emitted + streamer.finish() == final
            # The reference text shows every special token; ours hides some of them.
            reference_text = meta[run]["text"]
            for token in fixture_tokenizer.convert_ids_to_tokens(sorted(hidden)):
                reference_text = reference_text.replace(token, "")
            assert reference_text == final
