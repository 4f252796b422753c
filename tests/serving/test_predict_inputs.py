"""The Cog layer: predict()'s input checks, its OpenAPI schema, cog.yaml and the requirements
pins, checkpoint resolution, the GPU memory check and the weight downloader; predict.py behind
Cog's real HTTP server is tests/server/test_predict_http.py.

No model is loaded. The Hub is never contacted (download failures are provoked against a closed
local port).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import math
import os
import re
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import yaml
from PIL import Image

import predict
from cog import FieldInfo
from cog import Path as CogPath
from tools.parity.reference_data import reference_dir
from deepseek_vl2.weights import resolve as download_weights
from deepseek_vl2 import weights
from deepseek_vl2.serving import inputs as serving_inputs
from deepseek_vl2.serving.conversation import parse_messages
from tools import make_openapi_schema
from deepseek_vl2.weights import DownloadError


def check_inputs(**arguments: Any):
    """validate_inputs against predict.py's declarations, as run() calls it."""
    return serving_inputs.validate_inputs(arguments, predict.DECLARED)

REPO_ROOT = Path(__file__).resolve().parents[2]
CLOSED_HUB = "http://127.0.0.1:9"  # nothing listens on port 9 (discard): fails at once
COG_CONFIG_SCHEMA_ENV = "COG_CONFIG_SCHEMA"
DEFAULT_COG_CONFIG_SCHEMA = REPO_ROOT.parent / "shared" / "cog" / "config_schema_v1.0.json"


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(path)
    return path


def valid_args(image_path: Path, /, **changes: Any) -> dict[str, Any]:
    """A complete, valid set of predict() arguments (the Input defaults), with changes."""
    args = dict(
        image=CogPath(image_path), prompt="What is in this picture?", image_2=None, image_3=None,
        image_4=None, system_prompt=None, messages=None, temperature=0.1, top_p=0.9, top_k=0,
        repetition_penalty=1.1, max_length_tokens=2048, stop_sequences=None, seed=None,
    )  # fmt: skip
    args.update(changes)
    return args


# ---------------------------------------------------------------------- validate_inputs


def test_valid_inputs_come_back_checked(image_file: Path) -> None:
    second = image_file.with_name("second.png")
    request = check_inputs(
        **valid_args(image_file, image_3=CogPath(second), system_prompt="  Be brief.  ",
                     temperature=0, top_p=1, max_length_tokens=16, seed=7,
                     stop_sequences=" </answer> ,###,, ")
    )
    assert request.prompt == "<image>\n<image>\nWhat is in this picture?"  # untagged: before the text
    # image_2 left out: the images keep their order, the gap is skipped.
    assert request.images == [("image", image_file), ("image_3", second)]
    assert request.system_prompt == "Be brief."
    params = request.params
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 1.0, 16)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert params.seed == 7
    assert params.stop == ("</answer>", "###")


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.01), ("temperature", 2.01), ("temperature", math.nan),
        ("temperature", "0.5"), ("temperature", True),
        ("top_p", 0.0), ("top_p", 0.001), ("top_p", 1.0001), ("top_p", math.inf),
        ("top_k", -1), ("top_k", 1001), ("top_k", 2.0), ("top_k", False),
        ("repetition_penalty", 0.9), ("repetition_penalty", 2.5), ("repetition_penalty", None),
        ("max_length_tokens", 0), ("max_length_tokens", 4097), ("max_length_tokens", 10.5),
        ("seed", -1), ("seed", 2**32), ("seed", 1.5),
        ("prompt", ""), ("prompt", "   \n"), ("prompt", None), ("prompt", 42),
        ("system_prompt", 3), ("stop_sequences", [""]), ("stop_sequences", 3), ("stop_sequences", "[1"),
        ("stop_sequences", ["a", 1]), ("messages", 3), ("messages", "{}"),
        ("image_2", 12),
    ],
)  # fmt: skip
def test_invalid_input_is_refused_naming_it(image_file: Path, name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        check_inputs(**valid_args(image_file, **{name: value}))


def test_text_only_request_needs_no_image() -> None:
    request = check_inputs(prompt="Write a short poem about the sea.")
    assert (request.images, request.history) == ([], ())
    assert request.prompt == "Write a short poem about the sea."


def test_messages_become_the_earlier_turns(image_file: Path) -> None:
    turns = [{"role": "user", "content": "<image>\r\nWhat colour?"},
             {"role": "assistant", "content": "Red.\n"}]
    request = check_inputs(**valid_args(image_file, prompt="And the shape?", messages=json.dumps(turns)))
    assert request.history == ({"role": "user", "content": "<image>\nWhat colour?"},
                               {"role": "assistant", "content": "Red.\n"})
    assert request.prompt == "And the shape?"
    for blank in ("", "  \n", "[]"):
        assert check_inputs(**valid_args(image_file, messages=blank)).history == ()


def turns_json(*contents: Any) -> str:
    """Alternating user/assistant turns, as the messages input."""
    roles = ("user", "assistant")
    return json.dumps([{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)])


# Every malformed conversation, with the words of its message that say what to change.
MALFORMED_CONVERSATIONS = [
    ({"messages": "[{'role': 'user'}]"}, "messages is not valid JSON (Expecting property name"),
    ({"messages": "Hello there"}, "messages is not valid JSON"),
    ({"messages": '{"role": "user", "content": "Hi"}'}, "messages must be a JSON array of turns, got an object"),
    ({"messages": '"Hi"'}, "got a string"),
    ({"messages": "[1]"}, "messages[0] must be an object like {\"role\": \"user\", \"content\": \"...\"}, got a number"),
    ({"messages": '[{"role": "user", "content": "Hi", "images": ["https://example.com/a.png"]}]'},
     "Images inside messages are never fetched"),
    ({"messages": '[{"role": "user"}]'}, "messages[0] lacks 'content'"),
    ({"messages": '[{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]'},
     'messages[0].role must be "system", "user" or "assistant", got "bot"'),
    ({"messages": turns_json("Hi", "Yes")[:-1] + ', {"role": "system", "content": "Be brief"}]'},
     "messages[2] is a system message; only the first message may be one (or use the system_prompt input)"),
    ({"messages": '[{"role": "system", "content": "Be brief"}]', "system_prompt": "Be kind"},
     "the system prompt is given twice, in system_prompt and as the first message of messages"),
    ({"messages": '[{"role": "assistant", "content": "Hi"}]'},
     "messages[0] is an assistant turn where a user turn belongs"),
    ({"messages": turns_json("Hi", "Yes").replace('"assistant"', '"user"')},
     "messages[1] is a user turn where an assistant turn belongs; the turns must alternate"),
    ({"messages": turns_json("Hi")}, "messages ends with a user turn (messages[0]) and prompt holds a question too"),
    ({"messages": turns_json("Hi", "Yes"), "prompt": " "}, "prompt must not be empty: ask something about the "
     "image, or end messages with the user turn to answer"),
    ({"messages": turns_json("Hi", ["Yes"])}, "messages[1].content[0] must be an object with a \"type\""),
    ({"messages": turns_json("Hi", None)}, "messages[1].content must be a string or a list of parts, got null"),
    ({"messages": turns_json([{"type": "text"}], "Yes")}, "messages[0].content[0].text must be a string, got null"),
    ({"messages": turns_json([{"type": "input_audio"}], "Yes")},
     "messages[0].content[0] has the type 'input_audio'; a part is of type \"text\" or \"image_url\""),
    ({"messages": turns_json([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "Yes")},
     "messages[0].content[0].image_url is an https URL; images inside messages are never fetched"),
    ({"messages": turns_json([{"type": "image_url", "image_url": "file:///etc/passwd"}], "Yes")},
     "messages[0].content[0].image_url must be a data: URI"),
    ({"messages": turns_json([{"type": "image_url", "image_url": "data:image/png;base64,@@"}], "Yes")},
     "messages[0].content[0].image_url is not valid base64"),
    ({"messages": turns_json("Hi", [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}])},
     "messages[1] is an assistant message with an image; images go in user turns only"),
    ({"messages": turns_json("  ", "Yes")}, "messages[0].content is empty"),
    ({"messages": turns_json("Hi", "<image> here")}, "messages[1] is an assistant message with an image"),
    ({"messages": turns_json("Hi\u0007", "Yes")}, "messages[0].content contains the control character U+0007"),
    ({"messages": turns_json("Hi\ud800", "Yes")}, "contains the control character U+D800"),
    ({"messages": '[{"role": "user", "content": "Hi\x1b"}]'}, "messages contains the control character U+001B"),
    ({"messages": "[" * 100_000}, "nested too deeply"),
    ({"messages": turns_json("<image> and <image>", "Two.")},
     "the conversation (messages and prompt) has 2 <image> tag(s) but 1 image(s) were given; put exactly one"),
    ({"image": None, "prompt": "What is <image>?"}, "the prompt has 1 <image> tag(s) but 0 image(s)"),
    ({"image_2": "second", "prompt": "Only <image> here."},
     "the prompt has 1 <image> tag(s) but 2 image(s) were given; put exactly one <image> tag in the "
     "user messages for each image (add 1 more tag(s) for the images left unused)"),
    ({"messages": turns_json("<image> <image> <image>", "Three."), "prompt": "<image><image> more"},
     "has 5 <image> tags but at most 4 images fit in one request; remove 1 or more tags"),
]


@pytest.mark.parametrize("changes, expected", MALFORMED_CONVERSATIONS,
                         ids=[f"{i}" for i in range(len(MALFORMED_CONVERSATIONS))])
def test_malformed_conversations_say_what_to_change(image_file: Path, changes: dict,
                                                     expected: str) -> None:
    if changes.get("image_2") == "second":
        changes = {**changes, "image_2": CogPath(image_file)}
    with pytest.raises(ValueError) as error:
        check_inputs(**valid_args(image_file, **changes))
    assert expected in str(error.value)


def test_too_many_stop_sequences(image_file: Path) -> None:
    stops = [f"s{i}" for i in range(serving_inputs.MAX_STOP_SEQUENCES + 1)]
    for form in (",".join(stops), stops, json.dumps(stops)):
        with pytest.raises(ValueError, match="stop_sequences has 17 entries"):
            check_inputs(**valid_args(image_file, stop_sequences=form))


def test_stop_sequences_as_an_array_are_kept_exactly(image_file: Path) -> None:
    """Spaces, newlines and commas stay in an array's entries; the comma form is unchanged."""
    stops = [" END ", "\n\n", "a, b", "[x]"]
    for form in (stops, json.dumps(stops), "  " + json.dumps(stops)):
        assert check_inputs(**valid_args(image_file, stop_sequences=form)).params.stop == tuple(stops)
    assert check_inputs(**valid_args(image_file, stop_sequences=" a , b\n,")).params.stop == ("a", "b")
    with pytest.raises(ValueError, match='starts with "\\[", so it is read as a JSON array'):
        check_inputs(**valid_args(image_file, stop_sequences="[END]"))


def test_direct_call_defaults_come_from_the_input_declarations(image_file: Path) -> None:
    """Omitted arguments of a direct call arrive as Input() objects: their defaults apply."""
    signature = inspect.signature(predict.Predictor.run)
    declared = {
        name: param.default
        for name, param in signature.parameters.items()
        if name not in ("self", "image", "prompt")
    }
    assert all(isinstance(value, FieldInfo) for value in declared.values())
    request = check_inputs(image=CogPath(image_file), prompt="Hi", **declared)
    assert request.images == [("image", image_file)]
    params = request.params
    assert params.temperature == declared["temperature"].default
    assert params.top_p == declared["top_p"].default
    assert params.top_k == declared["top_k"].default
    assert params.repetition_penalty == declared["repetition_penalty"].default
    assert params.max_new_tokens == declared["max_length_tokens"].default
    assert (params.seed, params.stop, request.system_prompt) == (None, (), "")
    # Arguments left out entirely take the same defaults.
    assert check_inputs(image=CogPath(image_file), prompt="Hi").params == params


def first_piece(coroutine: Any) -> Any:
    """The first item of run()'s output (a coroutine returning a generator, as the server sees it)."""
    return next(iter(asyncio.run(coroutine)))


@pytest.mark.parametrize(
    "changes", [{"top_p": 0.0}, {"max_length_tokens": 0}, {"prompt": " "}, {"messages": "[{"},
                {"image": None, "prompt": "<image> What is it?"}]
)
def test_predict_checks_before_touching_the_model(image_file: Path, changes: dict) -> None:
    """A Predictor without setup() has no engine: bad input must fail before it is needed."""
    predictor = predict.Predictor()
    assert not hasattr(predictor, "service")
    with pytest.raises(ValueError):
        first_piece(predictor.run(**valid_args(image_file, **changes)))


def test_predict_reaches_the_model_only_with_valid_input(image_file: Path) -> None:
    with pytest.raises(AttributeError, match="service"):
        first_piece(predict.Predictor().run(**valid_args(image_file)))


def test_unreadable_image_fails_with_the_input_name(tmp_path: Path, image_file: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    from deepseek_vl2.inputs.images import load_image

    request = check_inputs(**valid_args(image_file, image_2=CogPath(broken)))
    with pytest.raises(ValueError, match="image_2"):
        [load_image(path, name=name) for name, path in request.images]


# ------------------------------------------------------------------------- OpenAPI schema


@functools.cache
def predictor_schema() -> dict[str, Any]:
    return make_openapi_schema.build_schema(str(REPO_ROOT / "predict.py") + ":Predictor")


def test_schema_inputs_match_the_predict_signature() -> None:
    inputs = predictor_schema()["components"]["schemas"]["Input"]
    params = [p for p in inspect.signature(predict.Predictor.run).parameters.values()
              if p.name != "self"]
    hints = get_type_hints(predict.Predictor.run)
    assert list(inputs["properties"]) == [p.name for p in params]
    required = []
    for order, param in enumerate(params):
        prop, declared = inputs["properties"][param.name], param.default
        assert prop["x-order"] == order
        assert prop.get("description") == declared.description
        optional = type(None) in get_args(hints[param.name])
        assert prop.get("nullable", False) == optional, param.name
        if declared.default is None:
            assert "default" not in prop
            if not optional:
                required.append(param.name)
        else:
            assert prop["default"] == declared.default
        assert prop.get("minimum") == declared.ge and prop.get("maximum") == declared.le
    assert inputs.get("required", []) == required == []
    images = [name for name, prop in inputs["properties"].items() if prop.get("format") == "uri"]
    assert images == list(serving_inputs.IMAGE_INPUTS)


def test_messages_and_stops_are_text_or_arrays_and_the_example_is_accepted() -> None:
    """`messages` and `stop_sequences` are a string or an array (anyOf); the messages example in
    its description is a valid value, and the description says URLs in it are never fetched."""
    properties = predictor_schema()["components"]["schemas"]["Input"]["properties"]
    prop = properties["messages"]
    assert prop["anyOf"] == [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]
    assert "format" not in prop and prop["nullable"] is True
    assert properties["stop_sequences"]["anyOf"] == [{"type": "string"},
                                                     {"type": "array", "items": {"type": "string"}}]
    example = re.search(r"Example: (\[.*?\])\. ", prop["description"])
    assert example, prop["description"]
    turns = parse_messages(example.group(1), max_text_chars=serving_inputs.MAX_TEXT_CHARS).turns
    assert [turn.role for turn in turns] == ["user", "assistant"]
    assert "never fetched" in prop["description"]
    image = predictor_schema()["components"]["schemas"]["Input"]["properties"]["image"]
    assert image["nullable"] is True and "text-only" in image["description"]


def test_schema_declares_streamed_text_output() -> None:
    schema = predictor_schema()
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "array" and output["items"] == {"type": "string"}
    assert output["x-cog-array-display"] == "concatenate"


def test_schema_streaming_flag_follows_the_decorator(tmp_path: Path) -> None:
    source = (REPO_ROOT / "predict.py").read_text(encoding="utf-8")
    assert "@cog.streaming" in source
    copy = tmp_path / "unstreamed_predict.py"
    copy.write_text(source.replace("    @cog.streaming\n", ""), encoding="utf-8")
    assert make_openapi_schema.is_streaming(f"{copy}:Predictor") is False
    assert make_openapi_schema.is_streaming(str(REPO_ROOT / "predict.py") + ":Predictor")


# How `cog build` reads Input() arguments: statically (tree-sitter), without running Python.
# Numbers must parse as Go float literals; strings must be one plain literal (it strips the
# quotes and keeps the rest verbatim: no escapes, no implicit concatenation); a bare name is
# looked up among module-level `NAME = <literal>` assignments. Anything else is dropped.
_GO_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_PLAIN_STRING = re.compile(r'"[^"\\\n]*"|\'[^\'\\\n]*\'')


def static_input_values(source: str) -> dict[str, dict[str, Any]]:
    """Input() keyword values of predict() in ``source`` as cog build's static reader sees them."""
    import ast

    tree = ast.parse(source)
    module_literals = {
        node.targets[0].id: ast.get_source_segment(source, node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }

    def literal(node: ast.expr, key: str) -> Any:
        text = ast.get_source_segment(source, node)
        if isinstance(node, ast.Name):
            text = module_literals.get(node.id, "")
        if key in ("ge", "le"):
            return float(text) if _GO_NUMBER.fullmatch(text) else "unreadable"
        if _PLAIN_STRING.fullmatch(text):
            return text[1:-1]
        if key == "default" and (text == "None" or _GO_NUMBER.fullmatch(text)):
            return ast.literal_eval(text)
        return "unreadable"

    predictor = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    method = next(
        n for n in predictor.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "run"
    )
    args = method.args.args[len(method.args.args) - len(method.args.defaults):]
    values = {}
    for arg, default in zip(args, method.args.defaults):
        assert isinstance(default, ast.Call) and ast.unparse(default.func) == "Input", arg.arg
        values[arg.arg] = {kw.arg: literal(kw.value, kw.arg) for kw in default.keywords}
    return values


def test_cog_build_reads_the_same_inputs_as_the_runtime() -> None:
    properties = predictor_schema()["components"]["schemas"]["Input"]["properties"]
    static = static_input_values((REPO_ROOT / "predict.py").read_text(encoding="utf-8"))
    assert list(static) == list(properties)
    for name, values in static.items():
        prop = properties[name]
        assert values.get("description") == prop["description"], name
        assert values.get("ge") == prop.get("minimum"), name
        assert values.get("le") == prop.get("maximum"), name
        assert values.get("default") == prop.get("default"), name


def test_static_reading_rejects_what_cog_build_cannot_read() -> None:
    source = (REPO_ROOT / "predict.py").read_text(encoding="utf-8")
    broken = source.replace("ge=0.01,", "ge=TOP_P_RANGE[0],").replace(
        'description="Optional second image."', 'description="Optional " "second image."'
    )
    assert broken != source
    static = static_input_values(broken)
    assert static["top_p"]["ge"] == "unreadable"
    assert static["image_2"]["description"] == "unreadable"


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k", "repetition_penalty",
                                  "max_length_tokens", "seed"])
def test_code_accepts_exactly_the_schema_range(image_file: Path, name: str) -> None:
    """The server's 422 range and the in-code check agree at both ends."""
    prop = predictor_schema()["components"]["schemas"]["Input"]["properties"][name]
    low, high = prop["minimum"], prop["maximum"]
    step = 1 if prop["type"] == "integer" else 1e-6
    for value in (low, high):
        check_inputs(**valid_args(image_file, **{name: value}))
    for value in (low - step, high + step):
        with pytest.raises(ValueError, match=name):
            check_inputs(**valid_args(image_file, **{name: value}))


# ---------------------------------------------------------------- cog.yaml and requirements


def load_cog_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "cog.yaml").read_text(encoding="utf-8"))


_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict, root: dict, where: str = "cog.yaml") -> list[str]:
    """Errors of ``value`` against the JSON-schema keywords Cog's config schema uses
    (type, properties, required, additionalProperties, items, anyOf, oneOf, not, enum,
    pattern, minItems, $ref). jsonschema is not a dependency of this project."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, root, where)
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{where}: {value!r} is not of type {'/'.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unknown key {key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], root, f"{where}[{index}]")
    if "anyOf" in schema and all(schema_errors(value, s, root, where) for s in schema["anyOf"]):
        errors.append(f"{where}: matches none of anyOf")
    if "oneOf" in schema:
        matches = sum(not schema_errors(value, s, root, where) for s in schema["oneOf"])
        if matches != 1:
            errors.append(f"{where}: matches {matches} of oneOf, not exactly one")
    if "not" in schema and not schema_errors(value, schema["not"], root, where):
        errors.append(f"{where}: matches a forbidden schema")
    return errors


@pytest.fixture(scope="module")
def cog_config_schema() -> dict:
    path = Path(os.environ.get(COG_CONFIG_SCHEMA_ENV, DEFAULT_COG_CONFIG_SCHEMA))
    if not path.is_file():
        pytest.skip(f"Cog's config schema not found at {path}; set {COG_CONFIG_SCHEMA_ENV}")
    return json.loads(path.read_text(encoding="utf-8"))


def test_cog_yaml_is_valid_for_cog(cog_config_schema: dict) -> None:
    assert schema_errors(load_cog_yaml(), cog_config_schema, cog_config_schema) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(predict=c["run"]),  # run and predict together
        lambda c: c.update(unknown_key=1),
        lambda c: c["build"].pop("python_version"),
        lambda c: c["build"].update(gpu="yes"),
        lambda c: c.update(concurrency={"default_target": 2}),
        lambda c: c.update(environment=["not a NAME=value pair"]),
    ],
)
def test_schema_check_catches_broken_configs(cog_config_schema: dict, breakage) -> None:
    config = load_cog_yaml()
    breakage(config)
    assert schema_errors(config, cog_config_schema, cog_config_schema)


def test_cog_yaml_settings() -> None:
    config = load_cog_yaml()
    build = config["build"]
    assert build["gpu"] is True
    assert str(build["python_version"]) == "3.11"
    assert (REPO_ROOT / build["python_requirements"]).is_file()
    assert build["sdk_version"] == version("cog")
    # Cog 0.23's names: `run:` (not `predict:`), BaseRunner.run (no deprecation warnings).
    assert "predict" not in config
    module, _, class_name = config["run"].partition(":")
    assert (REPO_ROOT / module).is_file() and hasattr(predict, class_name)
    runner = getattr(predict, class_name)
    assert issubclass(runner, __import__("cog").BaseRunner) and "predict" not in vars(runner)
    # One runner: a coroutine (Cog runs up to 8 at once) that returns a generator (Cog streams
    # it item by item; an async generator would be collected first by coglet 0.23.1).
    assert inspect.iscoroutinefunction(runner.run) and not inspect.isasyncgenfunction(runner.run)
    assert "concurrency" not in config  # deprecated: @cog.concurrent instead
    assert runner.run.__cog_concurrent_max__ == 8
    assert "pget" in " ".join(build["run"])
    # The CUDA the torch wheel was built for (None on a CPU-only build of torch).
    import torch

    if torch.version.cuda is not None:
        assert build["cuda"] == torch.version.cuda


def read_pins(name: str) -> dict[str, str]:
    """``package -> version`` of a requirements file; every entry must be pinned with ==."""
    pins = {}
    for line in (REPO_ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r "):
            continue
        package, separator, pinned = line.partition("==")
        assert separator and re.fullmatch(r"[\w.]+", pinned), f"{name}: unpinned {line!r}"
        pins[package.strip().lower().replace("_", "-")] = pinned
    return pins


def test_runtime_pins_match_the_tested_environment() -> None:
    if os.environ.get("DSVL2_PACKAGE_SET") == "gpu-rehearsal":
        pytest.skip("tools/gpu_check/rehearse_env.sh --suite runs the GPU machine's package set, not the pins")
    pins = read_pins("requirements.txt")
    for package in ("torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors",
                    "huggingface-hub", "pillow", "numpy"):
        assert package in pins, package
    for package, pinned in pins.items():
        assert version(package) == pinned, package
    assert int(pins["pillow"].split(".")[0]) < 13  # Pillow 13 changes the image tiles


def test_dev_requirements_pin_the_test_tools() -> None:
    text = (REPO_ROOT / "requirements-dev.txt").read_text(encoding="utf-8")
    assert "-r requirements.txt" in text.splitlines()
    pins = read_pins("requirements-dev.txt")
    for package in ("cog", "coglet", "pytest", "requests", "pyyaml"):
        assert version(package) == pins[package], package


# --------------------------------------------------------------------- checkpoint and GPU


def reference_checkpoint(name: str) -> Path:
    path = reference_dir() / "checkpoints" / name
    if not (path / "config.json").is_file():
        pytest.skip(f"reference checkpoint {path} not found; set DSVL2_REFERENCE_DIR")
    return path


def test_cog_weights_directory_is_used_as_is(monkeypatch) -> None:
    checkpoint = reference_checkpoint("tiny")
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    assert weights.resolve_checkpoint(str(checkpoint)) == checkpoint
    monkeypatch.setenv("COG_WEIGHTS", str(checkpoint))
    assert weights.resolve_checkpoint(None) == checkpoint


@pytest.mark.parametrize("source", ["ftp://example.com/weights.tar", "/nonexistent/dir"])
def test_cog_weights_must_be_a_local_directory_or_a_url(source: str) -> None:
    with pytest.raises(ValueError, match="COG_WEIGHTS must be a local checkpoint directory or an http"):
        weights.resolve_checkpoint(source)


def test_incomplete_checkpoint_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        weights.resolve_checkpoint(str(tmp_path))
    message = str(error.value)
    assert "processor_config.json" in message and "tokenizer.json" in message
    assert "model-00002-of-00002.safetensors" in message
    assert "model-00001-of-00002.safetensors" not in message


def test_empty_weights_dir_downloads_and_fails_clearly_offline(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "weights"
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    monkeypatch.setenv("DSVL2_VARIANT", "tiny")
    monkeypatch.setattr(download_weights, "DEFAULT_WEIGHTS_DIR", weights)
    monkeypatch.setattr(download_weights, "download",
                        functools.partial(download_weights.download, endpoint=CLOSED_HUB))
    with pytest.raises(DownloadError) as error:
        download_weights.resolve_checkpoint(None)
    message = str(error.value)
    assert "deepseek-ai/deepseek-vl2-tiny" in message and "could not be reached" in message
    assert str(weights) in message and "COG_WEIGHTS" in message


def test_unreachable_hub_is_one_clear_message_even_with_some_files(tmp_path: Path, monkeypatch) -> None:
    """weights/ holding config.json already, Hub unreachable: the same message at once, not
    "download finished but ... still lacks" after a long retry."""
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_weights.download("tiny", dest, endpoint=CLOSED_HUB)
    assert "could not be reached" in str(error.value) and "lacks" not in str(error.value)
    assert time.monotonic() - started < 30


def test_serve_plan_refuses_an_empty_weights_dir_without_a_variant(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    monkeypatch.delenv("DSVL2_VARIANT", raising=False)
    fine, line = download_weights.serve_plan(tmp_path)
    assert not fine and "DSVL2_VARIANT=tiny|small|base" in line and "about 55 GB" in line
    monkeypatch.setenv("DSVL2_VARIANT", "tiny")
    fine, line = download_weights.serve_plan(tmp_path)
    assert fine and "deepseek-ai/deepseek-vl2-tiny (about 7 GB)" in line


def test_parameters_on_disk_counts_bf16_weights_without_reading_headers(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(300, 7, dtype=torch.bfloat16), "b": torch.zeros(1000, dtype=torch.bfloat16)}
    save_file({"a": tensors["a"]}, str(tmp_path / "one.safetensors"))
    save_file({"b": tensors["b"]}, str(tmp_path / "two.safetensors"))
    counted = weights.parameters_on_disk([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
    exact = sum(t.numel() for t in tensors.values())
    assert exact <= counted <= exact + 2 * 1024  # each header adds a few hundred bytes


# ------------------------------------------------------------------------ weight download


@pytest.mark.parametrize(
    "name, repo_id",
    [
        ("tiny", "deepseek-ai/deepseek-vl2-tiny"),
        ("small", "deepseek-ai/deepseek-vl2-small"),
        ("base", "deepseek-ai/deepseek-vl2"),
        ("deepseek-vl2-small", "deepseek-ai/deepseek-vl2-small"),
        ("deepseek-ai/deepseek-vl2", "deepseek-ai/deepseek-vl2"),
        ("someone/fine-tuned-vl2", "someone/fine-tuned-vl2"),
    ],
)
def test_variant_names(name: str, repo_id: str) -> None:
    assert download_weights.resolve_variant(name) == repo_id


@pytest.mark.parametrize("name", ["huge", "", "a/b/c", "/x"])
def test_unknown_variant_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown DeepSeek-VL2 variant"):
        download_weights.resolve_variant(name)


def test_complete_checkpoint_has_nothing_missing() -> None:
    assert download_weights.missing_checkpoint_files(reference_checkpoint("small")) == []


def test_download_cli_reports_an_unreachable_hub(tmp_path: Path, capsys) -> None:
    status = download_weights.main(
        ["--variant", "small", "--dest", str(tmp_path / "w"), "--endpoint", CLOSED_HUB]
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "deepseek-ai/deepseek-vl2-small" in error and "could not be reached" in error


def test_download_limits_itself_to_inference_files() -> None:
    patterns = download_weights.ALLOW_PATTERNS
    for needed in ("config.json", "processor_config.json", "tokenizer.json",
                   "model.safetensors.index.json", "model-00001-of-00008.safetensors"):
        assert any(Path(needed).match(p) for p in patterns), needed
    for unwanted in ("pytorch_model.bin", "README.md", "images/arch.png"):
        assert not any(Path(unwanted).match(p) for p in patterns), unwanted


# ------------------------------------------------------------------------------ demo image


def test_demo_image_is_a_small_landscape_png() -> None:
    path = REPO_ROOT / "demo.png"
    assert path.stat().st_size < 200_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert 900 <= image.width <= 1100 and 450 <= image.height <= 550


def test_demo_image_is_what_the_script_draws() -> None:
    from tools.make_demo_image import draw_pipeline

    with Image.open(REPO_ROOT / "demo.png") as committed:
        assert committed.tobytes() == draw_pipeline().tobytes()


# ------------------------------------------------------------------- the runner


def test_predict_py_holds_one_runner() -> None:
    """One runner serves every mode (streaming, batching, cancel): no second class to choose."""
    import cog

    runners = [v for v in vars(predict).values()
               if isinstance(v, type) and issubclass(v, cog.BaseRunner) and v is not cog.BaseRunner]
    assert runners == [predict.Predictor]
