"""`/v1/responses` lines in OpenAI batches: what is accepted and refused, and Response objects that the
openai SDK's types read."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response

from common.lines import LineError, ParsedLine, parse_line
from tests.harness import Service
from worker.engine.params import ContextLengthError, GenerationResult, InvalidRequest
from worker.responses import error_code_and_param, response_body


def responses_line(custom_id: str, model: str = "tiny", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"model": model, "input": "def add(a, b):", "max_output_tokens": 8, **body}}


def parsed(line: dict) -> ParsedLine | LineError:
    return parse_line(json.dumps(line).encode(), 1)


@pytest.mark.parametrize("body", [
    {"input": "Say hi."},
    {"input": [{"role": "user", "content": "Say hi."}], "instructions": "Be brief."},
    {"input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}]},
    {"input": "x", "text": {"format": {"type": "text"}}, "metadata": {"k": "v"}, "store": False, "user": "u",
     "temperature": 0.7, "top_p": 0.9, "diffusion": {"block_length": 8}},
    # A second turn that passes back the first response's output message as it came.
    {"input": [{"role": "user", "content": "Say hi."},
               {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]},
               {"role": "user", "content": "Again."}]},
])
def test_accepted_bodies(body):
    line = parsed(responses_line("a", **body))
    assert isinstance(line, ParsedLine) and line.url == "/v1/responses" and line.model == "tiny"


@pytest.mark.parametrize(("body", "param", "mentions"), [
    ({"tools": [{"type": "function", "name": "f"}]}, "body.tools", "Extra inputs"),
    ({"reasoning": {"effort": "low"}}, "body.reasoning", "Extra inputs"),
    ({"previous_response_id": "resp_1"}, "body.previous_response_id", "Extra inputs"),
    ({"stream": True}, "body.stream", "False"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "body.input.0.content", "'input_image'"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "body.input.0.type", "message"),
    ({"input": []}, "body.input", "empty"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}, "body.input.0",
     "assistant"),
    ({"max_output_tokens": 0}, "body.max_output_tokens", "greater than or equal to 1"),
    ({"temperature": "1"}, "body.temperature", "JSON number"),
])
def test_refused_fields_are_named(body, param, mentions):
    error = parsed(responses_line("a", **body))
    assert isinstance(error, LineError) and error.param == param and mentions in error.message


def test_input_is_required():
    line = responses_line("a")
    del line["body"]["input"]
    error = parsed(line)
    assert isinstance(error, LineError) and (error.param, error.code) == ("body.input", "missing_required_parameter")


def test_engine_refusals_name_the_responses_fields():
    assert error_code_and_param(ContextLengthError("too long"), "/v1/responses") == (
        "context_length_exceeded", "body.input")
    assert error_code_and_param(InvalidRequest("too many", param="max_tokens"), "/v1/responses") == (
        "invalid_request", "body.max_output_tokens")
    assert error_code_and_param(InvalidRequest("bad", param="diffusion.steps"), "/v1/responses") == (
        "invalid_request", "body.diffusion.steps")


def test_a_responses_batch_round_trips_through_the_openai_types(service: Service):
    lines = [responses_line("plain"),
             responses_line("chat", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                            instructions="Answer in Python."),
             responses_line("long", max_output_tokens=24, temperature=0.8)]
    done = service.wait(service.submit(lines, endpoint="/v1/responses")["id"])
    assert done["status"] == "completed" and done["endpoint"] == "/v1/responses", done
    out = service.lines_of(done["output_file_id"])
    assert [line["custom_id"] for line in out] == ["plain", "chat", "long"]
    limits = {"plain": 8, "chat": 8, "long": 24}
    for line in out:
        response = Response.model_validate(line["response"]["body"])
        assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny"
        assert response.output_text != "" and response.output[0].role == "assistant"
        assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
        # The tiny random model never ends on its own: each response is cut at its max_output_tokens.
        assert (response.status, response.output[0].status) == ("incomplete", "incomplete")
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == limits[line["custom_id"]]
        assert line["response"]["body"]["usage"]["diffusion"]["forward_passes"] > 0


def test_an_unsupported_field_is_a_line_error(service: Service):
    lines = [responses_line("ok"), responses_line("tools", tools=[{"type": "web_search"}])]
    failed = service.wait(service.submit(lines, endpoint="/v1/responses")["id"])
    assert failed["status"] == "failed"
    assert [(e["line"], e["param"], e["code"]) for e in failed["errors"]["data"]] == [
        (2, "body.tools", "unknown_parameter")]


def test_a_responses_line_in_a_chat_batch_is_a_mismatched_endpoint(service: Service):
    failed = service.wait(service.submit([responses_line("a")], endpoint="/v1/chat/completions")["id"])
    assert [(e["param"], e["code"]) for e in failed["errors"]["data"]] == [("url", "mismatched_endpoint")]


def test_a_finished_response_is_completed():
    result = GenerationResult(token_ids=[1, 2], text="hi", finish_reason="stop", prompt_tokens=3,
                              completion_tokens=2, forward_passes=2, elapsed_s=0.1)
    response = Response.model_validate(response_body("/v1/responses", "tiny", result))
    assert (response.status, response.incomplete_details, response.output_text) == ("completed", None, "hi")
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (3, 2, 5)
