"""A batch travels the whole service: upload -> validate -> chunks on Celery -> engine -> files."""

from __future__ import annotations

import pytest

from tests.harness import Service, chat_line, completion_line


def _check_complete(service: Service, batch: dict, custom_ids: list[str]) -> list[dict]:
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": len(custom_ids), "completed": len(custom_ids), "failed": 0}
    output = service.lines_of(batch["output_file_id"])
    assert [line["custom_id"] for line in output] == custom_ids  # exactly once each, in input order
    assert batch["error_file_id"] is None
    assert batch["usage"]["output_tokens"] == sum(
        line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    return output


def test_completions_batch_in_several_chunks(tmp_path, tiny_model):
    with Service.embedded(tmp_path, tiny_model, chunk_size=2, max_batch_size=2) as service:
        ids = [f"req-{i}" for i in range(5)]
        batch = service.submit([completion_line(i, prompt=f"x = {n}\n", seed=n) for n, i in enumerate(ids)])
        assert batch["status"] == "validating" and batch["object"] == "batch"
        batch = service.wait(batch["id"])
        output = _check_complete(service, batch, ids)
        with service.runtime.session() as session:
            from db import repo
            assert len(repo.chunks_of(session, batch_id=batch["id"])) == 3
    body = output[0]["response"]["body"]
    assert output[0]["response"]["status_code"] == 200
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["diffusion"]["forward_passes"] >= 1
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_parallel_samplers_travel_the_service(service):
    lines = [completion_line("t", max_tokens=32, diffusion={"sampler": "threshold", "threshold": 0.5}),
             completion_line("f", max_tokens=32, diffusion={"sampler": "factor", "factor": 4.0}),
             completion_line("r", max_tokens=32)]
    output = _check_complete(service, service.wait(service.submit(lines)["id"]), ["t", "f", "r"])
    stats = {line["custom_id"]: line["response"]["body"]["usage"]["diffusion"] for line in output}
    assert stats["r"]["forward_passes"] == 32  # reference: one token per pass by default
    assert stats["f"]["forward_passes"] == 11 and stats["f"]["tokens_per_forward"] > 2.5  # 3 a pass


def test_infilling_template_travels_the_service(service):
    template = "    if n < 2:\n        return {{fill:4}}\n    return {{fill:12}}\n"
    line = completion_line("fill", prompt="def fib(n):\n", diffusion={"template": template, "block_length": 8})
    [output] = _check_complete(service, service.wait(service.submit([line])["id"]), ["fill"])
    text = output["response"]["body"]["choices"][0]["text"]
    assert text.startswith("    if n < 2:\n        return ") and "\n    return " in text
    expected = len(service.runtime.engine.encode_template(template))  # the template sets the length
    assert output["response"]["body"]["usage"]["completion_tokens"] == expected


def test_chat_batch(service):
    batch = service.wait(service.submit([chat_line("a"), chat_line("b", "Write code.")],
                                        endpoint="/v1/chat/completions")["id"])
    output = _check_complete(service, batch, ["a", "b"])
    message = output[0]["response"]["body"]["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)


def test_same_request_same_output_whatever_its_batch(service):
    """Per-request seeds: a request's text does not depend on what it was batched with."""
    alone = service.wait(service.submit([completion_line("x", seed=7, temperature=0.9)])["id"])
    mixed = service.wait(service.submit([completion_line(f"o{i}", prompt="import os\n" * i, seed=i)
                                         for i in range(1, 4)] + [completion_line("x", seed=7, temperature=0.9)])["id"])
    text = lambda batch, cid: next(line["response"]["body"]["choices"][0]["text"]  # noqa: E731
                                   for line in service.lines_of(batch["output_file_id"])
                                   if line["custom_id"] == cid)
    assert text(alone, "x") == text(mixed, "x")


@pytest.mark.services
def test_production_mode_redis_postgres_multi_chunk(production_service):
    """A real Celery worker on the real Redis, with PostgreSQL, runs a multi-chunk batch (chunk_size=3)."""
    ids = [f"p{i}" for i in range(7)]
    batch = production_service.submit([completion_line(i, seed=n) for n, i in enumerate(ids)])
    batch = production_service.wait(batch["id"])
    _check_complete(production_service, batch, ids)
    with production_service.runtime.session() as session:
        from db import repo
        assert len(repo.chunks_of(session, batch_id=batch["id"])) == 3
