"""Anthropic's Message Batches API, driven by the unmodified `anthropic` SDK against a live server."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest
from anthropic.types import Message
from anthropic.types.messages import MessageBatchIndividualResponse

from common.ids import now
from db import keys, repo
from db.models import Batch, BatchStatus
from tests.harness import DATABASES, Service, completion_line, service_on
from tests.live_server import live_server
from worker import finalize, pipeline, validation
from worker.engine.params import GenerationResult, InvalidRequest
from worker.engine.postprocess import first_stop
from worker.responses import error_code_and_param, response_body


def params(content: str = "Say hi.", **extra) -> dict:
    return {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}


def client(url: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def wait_ended(sdk: anthropic.Anthropic, batch_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while (batch := sdk.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.processing_status}"
        time.sleep(0.05)
    return batch


def results(sdk: anthropic.Anthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    lines = list(sdk.messages.batches.results(batch_id))
    assert len({line.custom_id for line in lines}) == len(lines)  # every custom_id exactly once
    return {line.custom_id: line for line in lines}


def test_the_sdk_creates_reads_lists_and_deletes_a_batch(service):
    requests = [{"custom_id": "plain", "params": params()},
                {"custom_id": "blocks", "params": params(system=[{"type": "text", "text": "Be brief."}],
                                                          stop_sequences=["\n\n"], temperature=0.5)},
                {"custom_id": "top-k", "params": params(top_k=5)},  # a Messages param diffbatch does not have
                {"custom_id": "image", "params": {**params(), "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]}}]
    with live_server(service.client.app) as url:
        sdk = client(url)
        created = sdk.messages.batches.create(requests=requests)
        assert created.type == "message_batch" and created.processing_status == "in_progress"
        assert created.request_counts.processing == 4 and created.results_url is None

        batch = wait_ended(sdk, created.id)
        assert batch.ended_at is not None and batch.ended_at >= batch.created_at
        assert batch.expires_at > batch.created_at and batch.results_url.endswith(f"/{batch.id}/results")
        assert batch.request_counts.model_dump() == {"processing": 0, "succeeded": 2, "errored": 2, "canceled": 0,
                                                      "expired": 0}
        got = results(sdk, batch.id)
        assert list(got) == ["plain", "blocks", "top-k", "image"]
        for custom_id in ("plain", "blocks"):
            message = got[custom_id].result.message
            assert message.role == "assistant" and message.model == "tiny" and message.content[0].type == "text"
            assert message.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
            assert message.usage.input_tokens > 0 and message.usage.output_tokens <= 8
        assert got["top-k"].result.type == "errored"
        error = got["top-k"].result.error.error
        assert error.type == "invalid_request_error" and "params.top_k" in error.message
        assert "'image'" in got["image"].result.error.error.message

        assert [b.id for b in sdk.messages.batches.list()] == [batch.id]
        # The OpenAI routes still serve it, as a batch of endpoint /v1/messages.
        openai_view = httpx.get(f"{url}/v1/batches/{batch.id}").json()
        assert openai_view["endpoint"] == "/v1/messages" and openai_view["request_counts"]["total"] == 4

        input_file = openai_view["input_file_id"]
        deleted = sdk.messages.batches.delete(batch.id)
        assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.batches.retrieve(batch.id)
        assert httpx.get(f"{url}/v1/files/{input_file}").status_code == 404  # its files went with it


@pytest.fixture(params=DATABASES)
def svc(request, tmp_path, tiny_model):
    """The API with no worker thread, on SQLite and PostgreSQL: the tests drive validation, chunks and
    finalizing themselves."""
    with service_on(request.param, tmp_path, tiny_model, chunk_size=2, max_batch_size=2) as service:
        yield service


@pytest.fixture
def api(tmp_path, tiny_model):
    """The API alone, for what is refused before anything is stored."""
    return Service.embedded(tmp_path, tiny_model)


def _chunks(svc: Service, batch_id: str) -> list[int]:
    with svc.runtime.session() as session:
        return [c.id for c in repo.chunks_of(session, batch_id=batch_id)]


def test_cancel_keeps_finished_results_and_cancels_the_rest(svc):
    with live_server(svc.client.app) as url:
        sdk = client(url)
        batch = sdk.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params(f"Q{i}")}
                                                      for i in range(5)])
        validation.validate_batch(svc.runtime, batch.id)
        pipeline.run_chunk(svc.runtime, _chunks(svc, batch.id)[0])  # two of five finish
        with pytest.raises(anthropic.AnthropicError, match="results_url"):  # results come once it has ended
            sdk.messages.batches.results(batch.id)
        _anthropic_error(httpx.get(f"{url}/v1/messages/batches/{batch.id}/results"), 400, "invalid_request_error")

        canceling = sdk.messages.batches.cancel(batch.id)
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
        finalize.maybe_finalize(svc.runtime, batch.id)
        ended = sdk.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        assert (ended.request_counts.succeeded, ended.request_counts.canceled) == (2, 3)
        got = results(sdk, batch.id)
        assert [(c, r.result.type) for c, r in got.items()] == [
            ("r0", "succeeded"), ("r1", "succeeded"), ("r2", "canceled"), ("r3", "canceled"), ("r4", "canceled")]
        assert sdk.messages.batches.cancel(batch.id).processing_status == "ended"  # a repeat changes nothing


def test_a_batch_cancelled_before_validation_has_every_request_canceled(svc):
    with live_server(svc.client.app) as url:
        sdk = client(url)
        batch = sdk.messages.batches.create(requests=[{"custom_id": c, "params": params()} for c in "abc"])
        sdk.messages.batches.cancel(batch.id)
        finalize.maybe_finalize(svc.runtime, batch.id)
        ended = wait_ended(sdk, batch.id)
        assert ended.request_counts.canceled == 3
        assert [(c, r.result.type) for c, r in results(sdk, batch.id).items()] == [
            ("a", "canceled"), ("b", "canceled"), ("c", "canceled")]


def test_a_model_no_worker_serves_errors_every_request(svc):
    with live_server(svc.client.app) as url:
        sdk = client(url)
        batch = sdk.messages.batches.create(requests=[{"custom_id": c, "params": {**params(), "model": "nope"}}
                                                      for c in ("x", "y")])
        validation.validate_batch(svc.runtime, batch.id)
        ended = sdk.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended" and ended.request_counts.errored == 2
        got = results(sdk, batch.id)
        assert list(got) == ["x", "y"]
        assert all("nope" in r.result.error.error.message for r in got.values())


def _anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and set(body) == {"type", "error"}
    return body["error"]["message"]


@pytest.mark.parametrize(("requests", "named"), [
    ([{"custom_id": "a", "params": params()}, {"custom_id": "a", "params": params()}], "requests.1.custom_id"),
    ([{"custom_id": "has space", "params": params()}], "requests.0.custom_id"),
    ([{"custom_id": "x" * 65, "params": params()}], "requests.0.custom_id"),
    ([{"custom_id": "a", "params": {"max_tokens": 8}}], "requests.0.params.model"),
    ([{"custom_id": "a", "params": params()}, {"custom_id": "b", "params": {**params(), "model": "other"}}],
     "requests.1.params.model"),
    ([{"custom_id": "a"}], "requests.0.params"),
    ([], "requests"),
])
def test_bad_creates_get_anthropic_error_bodies_naming_the_field(api, requests, named):
    with live_server(api.client.app) as url:
        with pytest.raises(anthropic.BadRequestError) as refused:
            client(url).messages.batches.create(requests=requests)
        assert refused.value.body["error"]["type"] == "invalid_request_error"
        assert refused.value.body["error"]["message"].startswith(named)


def test_nan_in_params_is_a_400_not_a_batch_stalled_on_postgresql(api):
    """Starlette reads NaN (the SDK would refuse to send it); PostgreSQL's json column refuses it."""
    body = json.dumps({"requests": [{"custom_id": "a", "params": params()},
                                    {"custom_id": "b", "params": params(temperature=float("nan"))}]})
    with live_server(api.client.app) as url:
        message = _anthropic_error(httpx.post(f"{url}/v1/messages/batches", content=body,
                                              headers={"content-type": "application/json"}), 400,
                                   "invalid_request_error")
        assert message.startswith("requests.1.params: NaN")


def test_too_many_requests_and_other_errors_in_anthropic_shape(api):
    api.settings.max_batch_requests = 2
    with live_server(api.client.app) as url:
        message = _anthropic_error(httpx.post(f"{url}/v1/messages/batches", json={
            "requests": [{"custom_id": f"r{i}", "params": params()} for i in range(3)]}), 400, "invalid_request_error")
        assert "at most 2" in message
        api.settings.max_upload_bytes = 200  # one request is about 130 bytes as a line
        message = _anthropic_error(httpx.post(f"{url}/v1/messages/batches", json={
            "requests": [{"custom_id": f"r{i}", "params": params()} for i in range(2)]}), 413, "request_too_large")
        assert "200 bytes" in message
        _anthropic_error(httpx.get(f"{url}/v1/messages/batches/batch_nope"), 404, "not_found_error")
        _anthropic_error(httpx.get(f"{url}/v1/messages/batches?limit=0"), 400, "invalid_request_error")
        _anthropic_error(httpx.post(f"{url}/v1/messages/batches", content=b"{"), 400, "invalid_request_error")
        # The OpenAI routes keep OpenAI's body.
        assert httpx.get(f"{url}/v1/batches/batch_nope").json()["error"]["code"] == "batch_not_found"


def test_keys_from_x_api_key_or_bearer_and_tenants_apart(svc):
    with svc.runtime.session() as session, session.begin():
        alice = keys.create_key(session, tenant_id="alice", now=now())[1]
        bob = keys.create_key(session, tenant_id="bob", now=now())[1]
    with live_server(svc.client.app) as url:
        batch = client(url, alice).messages.batches.create(requests=[{"custom_id": "a", "params": params()}])
        assert client(url, alice).messages.batches.retrieve(batch.id).id == batch.id  # x-api-key, as the SDK sends
        by_bearer = httpx.get(f"{url}/v1/messages/batches/{batch.id}", headers={"Authorization": f"Bearer {alice}"})
        assert by_bearer.status_code == 200 and by_bearer.json()["id"] == batch.id
        with pytest.raises(anthropic.NotFoundError) as hidden:
            client(url, bob).messages.batches.retrieve(batch.id)
        assert hidden.value.body["error"]["type"] == "not_found_error"
        for call in (client(url, bob).messages.batches.cancel, client(url, bob).messages.batches.delete):
            with pytest.raises(anthropic.NotFoundError):
                call(batch.id)
        assert list(client(url, bob).messages.batches.list()) == []
        with pytest.raises(anthropic.AuthenticationError) as refused:
            client(url, "dbk_0123456789abcdef." + "x" * 43).messages.batches.list()
        assert refused.value.body["error"]["type"] == "authentication_error"


def test_listing_pages_both_ways_and_shows_only_message_batches(svc):
    with live_server(svc.client.app) as url:
        sdk = client(url)
        made = [sdk.messages.batches.create(requests=[{"custom_id": "a", "params": params(f"Q{i}")}]).id
                for i in range(5)]
        openai_batch = svc.client.post("/v1/batches", json={"endpoint": "/v1/completions",
                                                            "requests": [completion_line("a")]}).json()
        newest_first = [b.id for b in sdk.messages.batches.list(limit=1000).data]
        assert sorted(newest_first) == sorted(made)
        assert [b.id for b in sdk.messages.batches.list(limit=2)] == newest_first  # the SDK follows after_id
        page = sdk.messages.batches.list(limit=2, after_id=newest_first[1])
        assert [b.id for b in page.data] == newest_first[2:4] and page.has_more
        back = sdk.messages.batches.list(limit=2, before_id=newest_first[3])
        assert [b.id for b in back.data] == newest_first[1:3] and back.has_more
        assert (back.first_id, back.last_id) == (newest_first[1], newest_first[2])
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.batches.retrieve(openai_batch["id"])


@pytest.mark.parametrize(("finish", "matched", "stop_reason"), [
    ("stop", None, "end_turn"), ("stop", "\n\n", "stop_sequence"), ("length", None, "max_tokens")])
def test_a_message_says_why_it_stopped(finish, matched, stop_reason):
    result = GenerationResult(token_ids=[1], text="hi", finish_reason=finish, prompt_tokens=4, completion_tokens=1,
                              forward_passes=1, elapsed_s=0.1, stop_sequence=matched)
    message = Message.model_validate(response_body("/v1/messages", "tiny", result))
    assert (message.stop_reason, message.stop_sequence, message.content[0].text) == (stop_reason, matched, "hi")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 1)


def test_the_stop_sequence_found_first_is_the_one_reported():
    assert first_stop("a END b STOP", ("STOP", "END")) == "END"
    assert first_stop("a STOP", ("ST", "STOP")) == "ST"  # same place: the first listed
    assert first_stop("abc", ("x",)) is None


def test_engine_refusals_name_the_params_field():
    assert error_code_and_param(InvalidRequest("too many", param="stop"), "/v1/messages") == (
        "invalid_request", "params.stop_sequences")
    assert error_code_and_param(InvalidRequest("bad", param="prompt"), "/v1/messages") == (
        "invalid_request", "params.messages")


@pytest.mark.parametrize(("status", "cancelled", "shown"), [
    (BatchStatus.in_progress, False, "in_progress"), (BatchStatus.cancelling, True, "canceling"),
    (BatchStatus.finalizing, True, "canceling"),  # writing a cancelled batch's files: not back in progress
    (BatchStatus.finalizing, False, "in_progress"), (BatchStatus.cancelled, True, "ended")])
def test_a_cancelled_batch_shows_canceling_until_it_has_ended(status, cancelled, shown):
    from api.anthropic_objects import processing_status

    assert processing_status(Batch(status=status, cancelling_at=1 if cancelled else None)) == shown
