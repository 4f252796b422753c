"""Write Cog's OpenAPI schema for a predictor, without the Go `cog` CLI or Docker.

Cog's HTTP server (coglet) validates prediction inputs, answers `/openapi.json` and allows
server-sent events only when `.cog/openapi_schema.json` exists in its working directory; `cog
build` normally generates that file. This script builds the same document from the predictor
with Cog's own Python inspector (`cog._inspector.create_predictor`, which reads the `Input()`
declarations and type hints) and writes it.

    .venv/bin/python -m tools.make_openapi_schema                   # predict.py:Predictor
    .venv/bin/python -m tools.make_openapi_schema --ref other.py:Runner --output x.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from cog import _adt as adt
from cog import _inspector

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF = "predict.py:Predictor"
DEFAULT_OUTPUT = Path(".cog") / "openapi_schema.json"

_OPTIONAL = (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)


def split_ref(ref: str) -> tuple[Path, str]:
    """Split a predictor reference such as ``predict.py:Predictor`` into (file, class name)."""
    file_part, _, class_name = ref.partition(":")
    return Path(file_part), class_name or "Predictor"


def load_predictor_info(ref: str) -> adt.PredictorInfo:
    """Inspect the predictor named by ``ref`` with Cog's own inspector (imports the module)."""
    file_path, class_name = split_ref(ref)
    file_path = file_path.resolve()
    if not file_path.is_file():
        raise FileNotFoundError(f"predictor file not found: {file_path}")
    module_dir = str(file_path.parent)
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    module_name = file_path.stem
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != file_path:
        del sys.modules[module_name]  # a different module of the same name: load ours
    with warnings.catch_warnings():  # Cog's BasePredictor/predict() deprecation notes
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor(module_name, class_name)


def is_streaming(ref: str) -> bool:
    """True when the predictor's run/predict method carries a ``streaming`` decorator.

    ``cog.streaming`` leaves no trace at run time (it returns the function unchanged); `cog build`
    finds it by reading the source, and so does this function.
    """
    file_path, class_name = split_ref(ref)
    tree = ast.parse(file_path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in (
                    "run",
                    "predict",
                ):
                    return any(_decorator_name(d) == "streaming" for d in item.decorator_list)
    return False


def _decorator_name(node: ast.expr) -> str:
    """The last dotted name of a decorator: ``@cog.streaming()`` -> ``streaming``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _number(value: float, field_type: adt.FieldType) -> int | float:
    """A bound as the JSON number type of the field (Cog's inspector stores floats)."""
    return int(value) if field_type.primitive is adt.PrimitiveType.INTEGER else value


def input_property(field: adt.InputField) -> dict[str, Any]:
    """The JSON schema of one input, in the shape `cog build` writes."""
    prop: dict[str, Any] = {"title": field.name.replace("_", " ").title(), "x-order": field.order}
    prop.update(field.type.json_type())
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.type.normalize(field.default))
    if field.type.repetition in _OPTIONAL:
        prop["nullable"] = True
    if field.description is not None:
        prop["description"] = field.description
    if field.ge is not None:
        prop["minimum"] = _number(field.ge, field.type)
    if field.le is not None:
        prop["maximum"] = _number(field.le, field.type)
    if field.min_length is not None:
        prop["minLength"] = field.min_length
    if field.max_length is not None:
        prop["maxLength"] = field.max_length
    if field.regex is not None:
        prop["pattern"] = field.regex
    if field.choices is not None:
        prop["enum"] = list(field.choices)
    if field.deprecated is not None:
        prop["deprecated"] = field.deprecated
    return prop


def input_schema(info: adt.PredictorInfo) -> dict[str, Any]:
    """The ``Input`` component: one property per predict() argument, in order."""
    properties = {name: input_property(field) for name, field in info.inputs.items()}
    required = [
        name
        for name, field in info.inputs.items()
        if field.default is None and field.type.repetition not in _OPTIONAL
    ]
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(schema: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    return {"description": "Successful Response", "content": content}


def _operation(summary: str, operation_id: str, *, body: bool = False, with_id: bool = False,
               response: dict[str, Any] | None = None) -> dict[str, Any]:
    """One OpenAPI operation; request body and response are the prediction envelopes."""
    op: dict[str, Any] = {"summary": summary, "operationId": operation_id}
    if with_id:
        op["parameters"] = [{"name": "prediction_id", "in": "path", "required": True,
                             "schema": {"title": "Prediction Id", "type": "string"}}]
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": _ref("PredictionRequest")}}}
    op["responses"] = {"200": _json_response(response if response is not None else {})}
    if body or with_id:
        error = {"application/json": {"schema": _ref("HTTPValidationError")}}
        op["responses"]["422"] = {"description": "Validation Error", "content": error}
    return op


def _paths(streaming: bool) -> dict[str, Any]:
    """The server's routes (coglet reads ``x-cog-streaming`` on POST /predictions for SSE)."""
    prediction = _ref("PredictionResponse")
    predict = _operation("Predict", "predict_predictions_post", body=True, response=prediction)
    predict["description"] = "Run a single prediction on the model"
    if streaming:
        predict["x-cog-streaming"] = True
    idempotent = _operation("Predict Idempotent",
                            "predict_idempotent_predictions__prediction_id__put",
                            body=True, with_id=True, response=prediction)
    cancel = _operation("Cancel", "cancel_predictions__prediction_id__cancel_post", with_id=True)
    return {
        "/": {"get": _operation("Root", "root__get")},
        "/health-check": {"get": _operation("Healthcheck", "healthcheck_health_check_get")},
        "/predictions": {"post": predict},
        "/predictions/{prediction_id}": {"put": idempotent},
        "/predictions/{prediction_id}/cancel": {"post": cancel},
        "/shutdown": {"post": _operation("Start Shutdown", "start_shutdown_shutdown_post")},
    }


def _field(title: str, **schema: Any) -> dict[str, Any]:
    return {"title": title, **schema}


def _components(info: adt.PredictorInfo) -> dict[str, Any]:
    """Input and Output of this predictor plus Cog's fixed envelope schemas."""
    text, when = {"type": "string"}, {"type": "string", "format": "date-time"}
    statuses = ["starting", "processing", "succeeded", "canceled", "failed"]
    return {
        "Input": input_schema(info),
        "Output": info.output.json_type(),
        "Status": {"title": "Status", "description": "An enumeration.", "type": "string",
                   "enum": statuses},
        "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
            "id": _field("Id", **text),
            "input": _ref("Input"),
            "webhook": _field("Webhook", type="string", format="uri"),
            "webhook_events_filter": _field("Webhook Events Filter", type="array", items=text),
        }},
        "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
            "id": _field("Id", **text),
            "input": _ref("Input"),
            "output": _ref("Output"),
            "status": _ref("Status"),
            "error": _field("Error", **text),
            "logs": _field("Logs", **text),
            "metrics": _field("Metrics", type="object"),
            "created_at": _field("Created At", **when),
            "started_at": _field("Started At", **when),
            "completed_at": _field("Completed At", **when),
        }},
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": _field("Detail", type="array", items=_ref("ValidationError")),
        }},
        "ValidationError": {"title": "ValidationError", "type": "object",
                            "required": ["loc", "msg", "type"], "properties": {
            "loc": _field("Location", type="array", items={"anyOf": [text, {"type": "integer"}]}),
            "msg": _field("Message", **text),
            "type": _field("Error Type", **text),
        }},
    }


def build_schema(ref: str = DEFAULT_REF) -> dict[str, Any]:
    """The whole OpenAPI 3.0.2 document for the predictor named by ``ref``."""
    info = load_predictor_info(ref)
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(is_streaming(ref)),
        "components": {"schemas": _components(info)},
    }


def write_schema(ref: str = DEFAULT_REF, output: Path = DEFAULT_OUTPUT) -> Path:
    """Build the schema for ``ref`` and write it as JSON to ``output``; returns the path."""
    schema = build_schema(ref)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    """Command line: write the schema (default ``.cog/openapi_schema.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=DEFAULT_REF, help="predictor, FILE.py:Class")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write")
    args = parser.parse_args(argv)
    path = write_schema(args.ref, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
