"""Malformed input ends as a `failed` batch naming the line and field, or as a 4xx; never a 500."""

from __future__ import annotations

import json

import pytest

from tests.harness import Service, chat_line, completion_line


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model):
    """One service for the module: every case is a separate batch, so they do not interfere."""
    with Service.embedded(tmp_path_factory.mktemp("validation"), tiny_model) as svc:
        yield svc

GOOD = completion_line("ok")


def _raw(*lines: dict | bytes | str) -> bytes:
    out = []
    for line in lines:
        out.append(line if isinstance(line, bytes) else
                   line.encode() if isinstance(line, str) else json.dumps(line).encode())
    return b"\n".join(out) + b"\n"


CASES = {
    "not json": (_raw(GOOD, "{not json"), 2, "invalid_json_line", None),
    "NaN is not JSON": (_raw(GOOD, json.dumps(completion_line("b", temperature=float("nan")))), 2,
                        "invalid_json_line", None),
    "missing custom_id": (_raw({"method": "POST", "url": "/v1/completions", "body": GOOD["body"]}),
                          1, "missing_required_parameter", "custom_id"),
    "missing prompt": (_raw(GOOD, {**GOOD, "custom_id": "b", "body": {"model": "tiny"}}),
                       2, "missing_required_parameter", "body.prompt"),
    "duplicate custom_id": (_raw(GOOD, completion_line("x"), completion_line("ok")), 3,
                            "duplicate_custom_id", "custom_id"),
    "wrong url": (_raw({**GOOD, "url": "/v1/embeddings"}), 1, "invalid_url", "url"),
    "url differs from endpoint": (_raw(GOOD, chat_line("c")), 2, "mismatched_endpoint", "url"),
    "unknown model": (_raw(completion_line("a", model="gpt-7")), 1, "model_not_found", "body.model"),
    "unknown model after blank lines": (_raw("", "", completion_line("a", model="gpt-7")), 3, "model_not_found",
                                        "body.model"),
    "stop of numbers": (_raw(completion_line("a", stop=[5])), 1, "invalid_value", "body.stop"),
    "missing url": (_raw({"custom_id": "a", "method": "POST", "body": GOOD["body"]}), 1,
                    "missing_required_parameter", "url"),
    "two models": (_raw(GOOD, completion_line("b", model="other")), 2, "mismatched_model", "body.model"),
    "unknown diffusion option": (_raw(completion_line("a", diffusion={"stepz": 4})), 1,
                                 "unknown_parameter", "body.diffusion.stepz"),
    "unsupported sampler": (_raw(completion_line("a", diffusion={"sampler": "magic"})), 1,
                            "invalid_value", "body.diffusion.sampler"),
    "option of another sampler": (_raw(completion_line("a", diffusion={"sampler": "factor", "threshold": 0.9})),
                                  1, "invalid_value", "body.diffusion"),
    "threshold out of range": (_raw(completion_line("a", diffusion={"sampler": "threshold", "threshold": 1.5})),
                               1, "invalid_value", "body.diffusion.threshold"),
    "unknown body field": (_raw(completion_line("a", logprobs=3)), 1, "unknown_parameter", "body.logprobs"),
    "bad max_tokens": (_raw(completion_line("a", max_tokens=0)), 1, "invalid_value", "body.max_tokens"),
    "max_tokens true": (_raw(completion_line("a", max_tokens=True)), 1, "invalid_value", "body.max_tokens"),
    "temperature as text": (_raw(completion_line("a", temperature="0.5")), 1, "invalid_value", "body.temperature"),
    "block_length as text": (_raw(completion_line("a", diffusion={"block_length": "8"})), 1, "invalid_value",
                             "body.diffusion.block_length"),
    "penalty out of range": (_raw(completion_line("a", frequency_penalty=2.5)), 1, "invalid_value",
                             "body.frequency_penalty"),
    "healing not a bool": (_raw(completion_line("a", diffusion={"token_healing": "maybe"})), 1, "invalid_value",
                           "body.diffusion.token_healing"),
    "only blank lines": (b"\n\n  \n", 0, "empty_file", None),
    # Lines json.loads refuses with other errors than a syntax error: a line error, not a crashed
    # validation that leaves the batch validating for good.
    "a number of 5,000 digits": (_raw(GOOD, json.dumps(GOOD).replace('"ok"', '"b"')[:-2] + ', "seed": '
                                      + "1" * 5000 + "}}"), 2, "invalid_json_line", None),
    "nested deeper than the parser goes": (_raw("[" * 100_000 + "]" * 100_000), 1, "invalid_json_line", None),
    "NUL in custom_id": (_raw({**GOOD, "custom_id": "a\x00b"}), 1, "invalid_value", "custom_id"),
    "non-UTF-8 line": (_raw(GOOD, b'{"custom_id": "\xff\xfe"}'), 2, "invalid_encoding", None),
    "not an object": (_raw("[1, 2]"), 1, "invalid_json_line", None),
    "prompt longer than the model allows": (_raw(completion_line("a", prompt="x" * 5000)), 1,
                                            "context_length_exceeded", "body.prompt"),
    "schedule with threshold": (_raw(completion_line("a", diffusion={"sampler": "threshold",
                                                                      "schedule": "maskgit_plus"})),
                                1, "invalid_value", "body.diffusion"),
    "unknown schedule": (_raw(completion_line("a", diffusion={"schedule": "cosine"})), 1, "invalid_value",
                         "body.diffusion.schedule"),
    "steps with factor": (_raw(completion_line("a", diffusion={"sampler": "factor", "steps": 4})), 1,
                          "invalid_value", "body.diffusion"),
    "steps beyond block": (_raw(completion_line("a", diffusion={"block_length": 8, "steps": 9})), 1,
                           "invalid_value", "body.diffusion.steps"),
    "editing with reference": (_raw(completion_line("a", diffusion={"sampler": "reference", "editing_threshold": 0.5})),
                               1, "invalid_value", "body.diffusion"),
    "editing out of range": (_raw(completion_line("a", diffusion={"sampler": "threshold", "editing_threshold": 0})),
                             1, "invalid_value", "body.diffusion.editing_threshold"),
    "post steps without editing": (_raw(completion_line("a", diffusion={"sampler": "threshold", "max_post_steps": 4})),
                                   1, "invalid_request", "body.diffusion.max_post_steps"),
    "template without a hole": (_raw(completion_line("a", diffusion={"template": "x = 1"})), 1,
                                "invalid_value", "body.diffusion.template"),
    "template with stop": (_raw(completion_line("a", stop=["\n"], diffusion={"template": "x = {{fill:2}}"})), 1,
                           "invalid_request", "body.stop"),
    "template hole too big": (_raw(completion_line("a", diffusion={"template": "x = {{fill:5000}}"})), 1,
                              "invalid_value", "body.diffusion.template"),
}


@pytest.mark.parametrize("content,line,code,param", CASES.values(), ids=CASES.keys())
def test_bad_file_fails_the_batch_naming_line_and_field(service, content, line, code, param):
    batch = service.wait(service.submit(content)["id"])
    assert batch["status"] == "failed"
    assert batch["failed_at"] is not None and batch["output_file_id"] is None
    first = batch["errors"]["data"][0]
    assert (first["line"], first["code"], first["param"]) == (line, code, param), first
    if line:
        assert first["message"].startswith(f"Line {line}:")
    if param:
        assert param in first["message"]


def test_chat_image_content_is_rejected_with_a_clear_error(service):
    line = chat_line("img")
    line["body"]["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    batch = service.wait(service.submit([line], endpoint="/v1/chat/completions")["id"])
    error = batch["errors"]["data"][0]
    assert batch["status"] == "failed" and error["param"] == "body.messages.0.content"
    assert "only text content" in error["message"]


def test_all_errors_are_listed_not_only_the_first(service):
    batch = service.wait(service.submit(_raw("nope", GOOD, "{", completion_line("ok")))["id"])
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (1, "invalid_json_line"), (3, "invalid_json_line"), (4, "duplicate_custom_id")]


def test_windows_line_endings_and_byte_order_mark_are_accepted(service):
    content = b"\xef\xbb\xbf" + json.dumps(completion_line("a")).encode() + b"\r\n" + \
        json.dumps(completion_line("b")).encode() + b"\r\n"
    batch = service.wait(service.submit(content)["id"])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 2


def test_zero_byte_upload_is_a_400(service):
    response = service.client.post("/v1/files", files={"file": ("empty.jsonl", b"")}, data={"purpose": "batch"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "The uploaded file is empty (0 bytes).",
                                        "type": "invalid_request_error", "param": "file", "code": "empty_file"}


@pytest.mark.parametrize("body,param", [
    ({"input_file_id": "file-x", "endpoint": "/v1/embeddings"}, "endpoint"),
    ({"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "1h"}, "completion_window"),
    ({"endpoint": "/v1/completions"}, "input_file_id"),
    ({"input_file_id": "file-x", "endpoint": "/v1/completions", "surprise": 1}, "surprise"),
])
def test_bad_create_body_is_a_400_naming_the_field(service, body, param):
    response = service.client.post("/v1/batches", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["message"].startswith(param)


def test_create_with_unknown_file_is_a_404(service):
    response = service.client.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/completions"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "file_not_found"


def test_non_json_create_body_is_a_400(service):
    response = service.client.post("/v1/batches", content=b"\xff not json",
                                   headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_threshold_takes_steps():
    """LLaDA2's and SDAR's dynamic rule: threshold with fewer steps than the block."""
    from common.lines import DiffusionOptions

    assert DiffusionOptions(sampler="threshold", threshold=0.95, steps=8, block_length=32).steps == 8


def test_an_engine_refusal_of_the_prompt_names_the_prompt_or_the_messages():
    from worker.engine.params import InvalidRequest
    from worker.responses import error_code_and_param

    refusal = InvalidRequest("prompt: it holds the mask token '<|mask|>' (id 3) in its last 2 tokens, ...",
                             param="prompt")
    assert error_code_and_param(refusal, "/v1/completions") == ("invalid_request", "body.prompt")
    assert error_code_and_param(refusal, "/v1/chat/completions") == ("invalid_request", "body.messages")
    template = InvalidRequest("diffusion.template holds the mask token '<|mask|>' (id 3) in its text; ...",
                              param="diffusion.template")
    assert error_code_and_param(template, "/v1/completions") == ("invalid_request", "body.diffusion.template")


def test_a_line_the_engine_cannot_prepare_fails_the_batch_instead_of_the_validation(service, monkeypatch):
    """Whatever goes wrong preparing one line is that line's error: a crash would leave the batch
    validating, retried by the reconciler for good."""
    from worker import validation

    real = validation.to_generation_request

    def prepare(engine, url, body, defaults=None):
        if body["prompt"] == "poison":
            raise RuntimeError("tokenizer fell over")
        return real(engine, url, body, defaults)

    monkeypatch.setattr(validation, "to_generation_request", prepare)
    batch = service.wait(service.submit([GOOD, completion_line("p", prompt="poison")])["id"])
    first = batch["errors"]["data"][0]
    assert batch["status"] == "failed" and (first["line"], first["param"]) == (2, "body"), batch
    assert "RuntimeError: tokenizer fell over" in first["message"]
