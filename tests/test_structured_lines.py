"""`response_format` json_schema on chat and completion lines and `text.format` on /v1/responses lines:
checked at upload, and every finished line's output parses as JSON and fits its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai.types.responses import Response

from common.lines import LineError, ParsedLine, parse_line
from tests.harness import Service

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer"},
    "role": {"enum": ["admin", "user", "guest"]},
    "active": {"type": "boolean"},
    "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
    "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}, "required": ["name", "age", "role"], "additionalProperties": False}
TAGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 3}}}


def chat_line(custom_id: str, schema: dict, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tiny", "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, **body}}


def parsed(line: dict) -> ParsedLine | LineError:
    return parse_line(json.dumps(line).encode(), 1)


def test_the_schema_is_stored_as_sent():
    line = parsed(chat_line("a", PERSON))
    assert isinstance(line, ParsedLine)
    assert line.body["response_format"]["json_schema"]["schema"] == PERSON


@pytest.mark.parametrize(("response_format", "param", "mentions"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}}},
     "body.response_format.json_schema.schema", "properties.a.oneOf"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "array", "items": {"type": "string"}}}}}},
     "body.response_format.json_schema.schema", "maxItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
     "body.response_format.json_schema.schema", "object"),
    ({"type": "json_object"}, "body.response_format.type", "json_schema"),
    ({"type": "json_schema"}, "body.response_format", "json_schema object"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": PERSON}},
     "body.response_format.json_schema.name", "pattern"),
])
def test_unsupported_formats_are_line_errors_naming_what(response_format, param, mentions):
    line = chat_line("a", PERSON)
    line["body"]["response_format"] = response_format
    error = parsed(line)
    assert isinstance(error, LineError) and error.param == param and mentions in error.message, error


def test_every_structured_line_parses_and_fits_its_schema(service: Service):
    lines = [chat_line(f"person-{i}", PERSON, temperature=t, seed=i) for i, t in enumerate([0.0, 0.0, 1.0, 1.0])]
    lines += [chat_line("tags", TAGS), chat_line("free", PERSON, response_format={"type": "text"}, max_tokens=8)]
    done = service.wait(service.submit(lines, endpoint="/v1/chat/completions")["id"])
    assert done["status"] == "completed", done["errors"]
    out = {line["custom_id"]: line for line in service.lines_of(done["output_file_id"])}
    for custom_id, schema in [*((f"person-{i}", PERSON) for i in range(4)), ("tags", TAGS)]:
        body = out[custom_id]["response"]["body"]
        document = json.loads(body["choices"][0]["message"]["content"])
        jsonschema.validate(document, schema)
        assert body["choices"][0]["finish_reason"] == "stop"
    assert out["free"]["response"]["status_code"] == 200


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_max_tokens_below_the_skeleton_is_an_error_naming_it(service: Service, field):
    """It would cut the document, so invalid JSON: refused at validation, like other lines the engine refuses."""
    failed = service.wait(service.submit([chat_line("short", PERSON, **{field: 2})],
                                         endpoint="/v1/chat/completions")["id"])
    assert failed["status"] == "failed"
    [error] = failed["errors"]["data"]
    assert (error["line"], error["param"]) == (1, f"body.{field}") and "takes" in error["message"], error


def test_completion_lines_take_a_schema_too(service: Service):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {
        "model": "tiny", "prompt": "A user record:\n", "max_tokens": 512,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}}
    done = service.wait(service.submit([line], endpoint="/v1/completions")["id"])
    [out] = service.lines_of(done["output_file_id"])
    jsonschema.validate(json.loads(out["response"]["body"]["choices"][0]["text"]), PERSON)


def test_a_responses_line_with_a_json_schema_format_round_trips(service: Service):
    line = {"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {
        "model": "tiny", "input": "A person, please.",
        "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}}}
    done = service.wait(service.submit([line], endpoint="/v1/responses")["id"])
    [out] = service.lines_of(done["output_file_id"])
    response = Response.model_validate(out["response"]["body"])
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)


def test_a_responses_format_without_its_schema_is_a_line_error():
    line = {"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {
        "model": "tiny", "input": "x", "text": {"format": {"type": "json_schema", "name": "p"}}}}
    error = parsed(line)
    assert isinstance(error, LineError) and error.param == "body.text.format", error
