"""Conversations: text-only questions and earlier turns (`messages`) through the same predictor.

Every reference case is sent the way a client would send it — the last user turn as `prompt`,
the turns before it as the `messages` JSON, the images as file inputs — and must give the
official processor's tokens (through predict.py's checks and the engine's `prepare`, the path
a prediction takes), and, through Cog's real HTTP server, the official greedy answer (its text
and token count, streamed). Text-only and multi-turn requests batched beside an image request
give the answers each gives alone.
The malformed-conversation cases are in test_robustness.py, test_predict_inputs.py and test_predict_http.py.
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import predict
from cog import Path as CogPath
from tools.testing.cog_server import CogServer, cog_server, data_uri
from tools.parity.reference_data import (
    case_image_files,
    case_meta,
    case_names,
    checkpoint_dir,
    config_names,
    expected_processor_tensors,
    reference_available,
    reference_dir,
    skip_reason,
)

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.inputs.chat_template import ASSISTANT_ROLE, USER_ROLE
from deepseek_vl2.inputs.images import load_image
from deepseek_vl2.inputs.processor import GROUNDING_TOKENS
from deepseek_vl2.serving import inputs as serving_inputs
from deepseek_vl2.serving.conversation import IMAGE_TAG

pytestmark = pytest.mark.skipif(not reference_available(), reason=skip_reason())

ROLE_NAMES = {USER_ROLE: "user", ASSISTANT_ROLE: "assistant"}
EOS = "<｜end▁of▁sentence｜>"
CONFIG = "tiny"  # the reference checkpoint served through Cog's server
SLOTS = 3  # the text-only, the multi-turn and the image request at once


def client_request(case: str) -> tuple[str, list[dict[str, str]], list[Path]]:
    """A reference case as a client sends it: (prompt, earlier turns, image files in order)."""
    conversation = case_meta(case)["conversation"]
    assert conversation[-1]["role"] == ASSISTANT_ROLE and not conversation[-1]["content"]
    *earlier, last_user, _ = conversation
    history = [{"role": ROLE_NAMES[m["role"]], "content": m["content"]} for m in earlier]
    files = [reference_dir() / "inputs" / name for name in case_image_files(case)]
    return last_user["content"], history, files


def conversation_cases() -> list[str]:
    """Cases with earlier turns or without images: what this feature adds."""
    return [case for case in case_names()
            if client_request(case)[1] or not client_request(case)[2]]


def http_inputs(case: str, **settings: Any) -> dict[str, Any]:
    """The JSON input of a reference case for Cog's server."""
    prompt, history, files = client_request(case)
    inputs: dict[str, Any] = {"prompt": prompt, **settings}
    if history:
        inputs["messages"] = json.dumps(history)
    for name, path in zip(serving_inputs.IMAGE_INPUTS, files):
        inputs[name] = data_uri(path)
    return inputs


@functools.cache
def generator() -> Generator:
    return Generator.load(checkpoint_dir(CONFIG), device="cpu", dtype=torch.float32)


def prepared(prompt: str, history: list[dict[str, str]], files: list[Path]):
    """What a prediction feeds the model: predict.py's checks, the images decoded by name, the
    engine's prepare (as serving.service does)."""
    arguments = {"prompt": prompt, "messages": json.dumps(history) if history else None}
    arguments.update({name: CogPath(path) for name, path in zip(serving_inputs.IMAGE_INPUTS, files)})
    request = serving_inputs.validate_inputs(arguments, predict.DECLARED)
    images = [load_image(path, name=name) for name, path in request.images]
    return generator().prepare(request.prompt, images, request.system_prompt, request.history)


def official_greedy(case: str, config: str = CONFIG) -> dict[str, Any]:
    path = reference_dir() / "outputs" / config / f"{case}.json"
    return json.loads(path.read_text(encoding="utf-8"))["greedy"]


def official_prompt_tokens(case: str) -> int:
    return int(expected_processor_tensors(case)["input_ids"].numel())


# ------------------------------------------------------------------ tokens, the product path


@pytest.mark.parametrize("case", case_names())
def test_a_client_request_gets_the_official_tokens(case: str) -> None:
    """Roles, separators, the eos after each reply, the images: token for token."""
    ours = prepared(*client_request(case))
    expected = expected_processor_tensors(case)
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert torch.equal(ours.images_seq_mask, expected["images_seq_mask"])
    assert torch.equal(ours.images_spatial_crop, expected["images_spatial_crop"])


@pytest.mark.parametrize("case", [c for c in case_names() if not client_request(c)[1]])
def test_images_without_tags_go_before_the_text(case: str) -> None:
    """A one-turn case with its leading tags removed: the images are put back where they were."""
    prompt, _, files = client_request(case)
    leading = IMAGE_TAG + "\n"
    untagged = prompt.replace(leading, "", len(files))
    if not files or prompt != leading * len(files) + untagged or IMAGE_TAG in untagged:
        pytest.skip(f"{case}: its images are not all tagged at the start of the prompt")
    assert torch.equal(prepared(untagged, [], files).input_ids,
                       expected_processor_tensors(case)["input_ids"])


def official_layout_ids(turns: list[tuple[str, str]], image_tokens: list[int]) -> list[int]:
    """The official processor's ids written out by hand: bos; per user turn the template
    "<|User|>: " + text + "\n\n<|Assistant|>:" encoded in pieces split at <image>, each tag
    standing for its image's run of <image> ids; per assistant reply its text, then eos."""
    tokenizer = generator().processor.tokenizer
    vocab = tokenizer.get_vocab()
    ids, images = [vocab["<｜begin▁of▁sentence｜>"]], iter(image_tokens)
    for role, text in turns:
        if role == "assistant":
            ids += tokenizer.encode(text, add_special_tokens=False) + [vocab[EOS]]
            continue
        for index, piece in enumerate(f"<|User|>: {text}\n\n<|Assistant|>:".split(IMAGE_TAG)):
            if index:
                ids += [vocab[IMAGE_TAG]] * next(images)
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def test_the_hand_written_layout_is_the_official_one() -> None:
    """The layout above gives the official processor's ids for its own two-turn case."""
    prompt, history, files = client_request("two_turn")
    turns = [(t["role"], t["content"]) for t in history] + [("user", prompt)]
    image_tokens = expected_processor_tensors("two_turn")["images_seq_mask"].sum().item()
    assert official_layout_ids(turns, [image_tokens]) == expected_processor_tensors("two_turn")["input_ids"].flatten().tolist()


def test_an_untagged_image_goes_to_the_newest_user_turn() -> None:
    """A text turn, then a new image with the next question: the image goes before the new
    question, as the official web demo writes it (not into the earlier turn)."""
    image = reference_dir() / "inputs" / "small_200x150.png"
    history = [{"role": "user", "content": "What is a square?"},
               {"role": "assistant", "content": "A shape with four equal sides."}]
    ours = prepared("Is there one here?", history, [image])
    expected = official_layout_ids(
        [("user", "What is a square?"), ("assistant", "A shape with four equal sides."),
         ("user", "<image>\nIs there one here?")], [generator().processor.num_image_tokens(200, 150)])
    assert ours.input_ids.flatten().tolist() == expected
    # The same earlier turns keep the same leading tokens whatever the new turn brings.
    text_only = prepared("Is there one here?", history, [])
    prefix = len(official_layout_ids([("user", "What is a square?"),
                                      ("assistant", "A shape with four equal sides.")], []))
    assert torch.equal(ours.input_ids.flatten()[:prefix], text_only.input_ids.flatten()[:prefix])


def prepared_arguments(**arguments: Any):
    """prepare() of a request given as run() arguments (files as paths), as a prediction does."""
    arguments = {name: CogPath(value) if name.startswith("image") else value for name, value in arguments.items()}
    request = serving_inputs.validate_inputs(arguments, predict.DECLARED)
    images = [load_image(source, name=name) for name, source in request.images]
    return generator().prepare(request.prompt, images, request.system_prompt, request.history)


def image_part(path: Path) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(path)}}


def _forms() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(an OpenAI-style or new form, the plain form it must equal), by name."""
    small = reference_dir() / "inputs" / "small_200x150.png"
    wide = reference_dir() / "inputs" / "wide_1000x300.png"
    earlier = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A picture."}]
    return {
        "array = its JSON text": (dict(messages=earlier, prompt="And now?", image=small),
                                  dict(messages=json.dumps(earlier), prompt="And now?", image=small)),
        "system message = system_prompt": (
            dict(messages=[{"role": "system", "content": " Be brief. "}, *earlier], prompt="And now?"),
            dict(messages=earlier, prompt="And now?", system_prompt="Be brief.")),
        "last user turn of messages = prompt": (
            dict(messages=[*earlier, {"role": "user", "content": "And now?"}], image=small),
            dict(messages=earlier, prompt="And now?", image=small)),
        "text parts = their texts joined by newlines": (
            dict(prompt="Hi", messages=[{"role": "user", "content": [{"type": "text", "text": "What"},
                                                                     {"type": "text", "text": "is this?"}]},
                                        earlier[1]]),
            dict(prompt="Hi", messages=[{"role": "user", "content": "What\nis this?"}, earlier[1]])),
        "image part, then text = the image input untagged": (
            dict(messages=[*earlier, {"role": "user", "content": [image_part(wide),
                                                                  {"type": "text", "text": "And now?"}]}]),
            dict(messages=earlier, prompt="And now?", image=wide)),
        "image part in an earlier turn = a tag there": (
            dict(messages=[{"role": "user", "content": [image_part(wide), {"type": "text", "text": "What?"}]},
                           earlier[1]], prompt="And now?"),
            dict(messages=[{"role": "user", "content": "<image>\nWhat?"}, earlier[1]], prompt="And now?",
                 image=wide)),
        "image parts and image inputs mixed": (
            dict(messages=[{"role": "user", "content": [image_part(wide)]}, earlier[1]],
                 prompt="Compare with <image>.", image=small),
            dict(messages=[{"role": "user", "content": "<image>"}, earlier[1]], prompt="Compare with <image>.",
                 image=wide, image_2=small)),
    }


@pytest.mark.parametrize("form", list(_forms()) if reference_available() else [])
def test_every_form_gives_the_tokens_of_its_plain_form(form: str) -> None:
    given, plain = _forms()[form]
    ours, expected = prepared_arguments(**given), prepared_arguments(**plain)
    assert torch.equal(ours.input_ids, expected.input_ids)
    assert torch.equal(ours.images_seq_mask, expected.images_seq_mask)
    assert torch.equal(ours.images_spatial_crop, expected.images_spatial_crop)
    assert torch.equal(ours.images, expected.images)


@pytest.mark.parametrize("in_prompt", [1, 2])
def test_three_or_four_images_in_a_conversation_are_one_view_each(in_prompt: int) -> None:
    """The image count of the whole conversation decides the tiling: with 3 or 4, even a wide
    image that alone gets 3x1 tiles is seen once at 384x384."""
    inputs = reference_dir() / "inputs"
    wide = inputs / "wide_1000x300.png"
    assert prepared("Describe.", [], [wide]).images_spatial_crop.tolist() == [[3, 1]]
    history = [{"role": "user", "content": "<image> <image> What are these?"},
               {"role": "assistant", "content": "Two pictures."}]
    files = [wide, inputs / "square_800x800.png", *[inputs / "small_200x150.png"] * in_prompt]
    ours = prepared("And " + "<image> " * in_prompt + "?", history, files)
    one_view = generator().processor.num_image_tokens(1000, 300, num_images=3)
    assert ours.images_spatial_crop.tolist() == [[1, 1]] * len(files)
    assert ours.num_image_tokens == [one_view] * len(files)


def test_grounding_tags_in_earlier_turns_stay_tags() -> None:
    """A grounding answer sent back as an earlier turn keeps its tags as tokens."""
    reply = "<|ref|>the square<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>"
    history = [{"role": "user", "content": "<|grounding|>Locate <|ref|>the square<|/ref|>."},
               {"role": "assistant", "content": reply}]
    files = [reference_dir() / "inputs" / "small_200x150.png"]
    ids = prepared("And the circle?", history, files).input_ids
    vocab = generator().processor.tokenizer.get_vocab()
    counts = {tag: int((ids == vocab[tag]).sum()) for tag in GROUNDING_TOKENS}
    assert counts == {"<|ref|>": 2, "<|/ref|>": 2, "<|det|>": 1, "<|/det|>": 1, "<|grounding|>": 1}


# ----------------------------------------------------------------- through Cog's real server


@pytest.fixture(scope="module")
def server() -> CogServer:
    with cog_server("predict.py:Predictor", weights=checkpoint_dir(CONFIG), retry_busy=10,
                    env={"COG_MAX_CONCURRENCY": str(SLOTS)}) as running:
        yield running


def _text(body: dict[str, Any]) -> str:
    assert body.get("status") == "succeeded", body
    return "".join(body["output"])


@pytest.fixture(scope="module", params=config_names())
def config_server(request: pytest.FixtureRequest) -> tuple[str, CogServer]:
    """Cog's server on each reference checkpoint in turn: (config, server)."""
    with cog_server("predict.py:Predictor", weights=checkpoint_dir(request.param),
                    retry_busy=10) as running:
        yield request.param, running


@pytest.mark.parametrize("case", conversation_cases())
def test_conversation_streams_the_official_greedy_answer(config_server: tuple[str, CogServer],
                                                         case: str) -> None:
    """Text and token count of the official greedy decode (16 tokens, or fewer where it stopped
    at eos: the end-of-sentence token is counted but not shown)."""
    config, server = config_server
    greedy = official_greedy(case, config)
    status, events = server.predict_stream(
        http_inputs(case, temperature=0, max_length_tokens=greedy["n_new"]))
    assert status == 200
    assert events[0].event == "start" and events[-1].event == "completed", events[-1]
    assert events[-1].data["status"] == "succeeded", events[-1].data
    chunks = [event.data["chunk"] for event in events if event.event == "output"]
    shown = greedy["text"].removesuffix(EOS) if greedy["stopped_at_eos"] else greedy["text"]
    assert len(chunks) > 1 and "".join(chunks) == shown
    metrics = {event.data["name"]: event.data["value"] for event in events if event.event == "metric"}
    assert metrics["input_token_count"] == official_prompt_tokens(case)
    assert metrics["output_token_count"] == greedy["n_new"]


def test_text_only_and_multi_turn_batched_beside_an_image_request(server: CogServer) -> None:
    """Three requests at once, one decode batch: each answer equals the one it gets alone."""
    text_only = next(c for c in conversation_cases() if not client_request(c)[2])
    multi_turn = next(c for c in conversation_cases() if client_request(c)[1] and client_request(c)[2])
    single_image = next(c for c in case_names() if not client_request(c)[1] and client_request(c)[2])
    requests_ = [http_inputs(case, temperature=0, max_length_tokens=40)
                 for case in (text_only, multi_turn, single_image)]
    alone = [server.predict(request)[1] for request in requests_]
    log_start = len(server.log())
    with ThreadPoolExecutor(max_workers=SLOTS) as pool:
        together = list(pool.map(server.predict, requests_))
    assert [status for status, _ in together] == [200] * SLOTS
    assert [_text(body) for _, body in together] == [_text(body) for body in alone]
    for (_, body), single in zip(together, alone):
        assert body["metrics"]["input_token_count"] == single["metrics"]["input_token_count"]
        assert body["metrics"]["output_token_count"] == single["metrics"]["output_token_count"]
    # They ran at once: all three reached the engine before the first one finished.
    log = server.log()[log_start:]
    submitted = [match.start() for match in re.finditer("prompt tokens:", log)]
    assert len(submitted) == SLOTS and max(submitted) < log.index("generated ")


def test_cancelling_a_text_only_conversation(server: CogServer) -> None:
    text_only = next(c for c in conversation_cases() if not client_request(c)[2])
    prediction_id = f"conversation-{uuid.uuid4().hex}"
    # The random model rarely ends an answer: this would run for minutes on a CPU.
    pending = server.predict_in_background(
        http_inputs(text_only, temperature=0, max_length_tokens=3000), prediction_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # cancel once the request reached the engine
        log = server.log()
        if prediction_id in log and "prompt tokens" in log.split(prediction_id, 1)[1]:
            break
        time.sleep(0.02)
    assert server.cancel(prediction_id) == 200
    status, body = pending.result(timeout=120)
    assert body["status"] == "canceled", body
    greedy = official_greedy(text_only)
    status, body = server.predict(http_inputs(text_only, temperature=0, max_length_tokens=greedy["n_new"]))
    assert _text(body) == greedy["text"]


def test_openai_style_messages_through_cogs_server(server: CogServer) -> None:
    """messages as a JSON array — a system message, the question as the last user turn with a
    data: image part — gets the answer of its plain form."""
    small = reference_dir() / "inputs" / "small_200x150.png"
    earlier = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A picture."}]
    question = {"role": "user", "content": [image_part(small), {"type": "text", "text": "And now?"}]}
    settings = {"temperature": 0, "max_length_tokens": 12}
    openai = {"messages": [{"role": "system", "content": "Be brief."}, *earlier, question], **settings}
    plain = {"messages": json.dumps(earlier), "system_prompt": "Be brief.", "prompt": "And now?",
             "image": data_uri(small), **settings}
    (status, ours), (_, expected) = server.predict(openai), server.predict(plain)
    assert status == 200
    assert _text(ours) == _text(expected)
    assert ours["metrics"]["input_token_count"] == expected["metrics"]["input_token_count"]


def test_stop_sequences_as_an_array_through_cogs_server(server: CogServer) -> None:
    """An array's stop sequences are used exactly as sent (spaces and commas kept), as JSON or as
    its text."""
    single_image = next(c for c in case_names() if not client_request(c)[1] and client_request(c)[2])
    request = http_inputs(single_image, temperature=0, max_length_tokens=40)
    full = _text(server.predict(request)[1])
    stops = [full[3:7], "never, seen"]
    assert len(stops[0]) == 4
    cut = full[:min(full.index(stop) for stop in stops if stop in full)]
    for form in (stops, json.dumps(stops)):
        assert _text(server.predict({**request, "stop_sequences": form})[1]) == cut
