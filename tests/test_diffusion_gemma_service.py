"""A DiffusionGemma checkpoint served end to end: upload -> validate -> Celery worker -> output file."""

from __future__ import annotations

import pytest

from tests.harness import Service, chat_line, completion_line

MODEL = "tiny-dg"


@pytest.fixture(scope="module")
def dg_model(tmp_path_factory):
    from worker.engine.diffusion_gemma.tiny import create_tiny_diffusion_gemma

    return create_tiny_diffusion_gemma(tmp_path_factory.mktemp("models") / MODEL, canvas_length=16,
                                       max_denoising_steps=4)


@pytest.fixture(scope="module")
def dg_service(tmp_path_factory, dg_model):
    """One service for the module: starting a worker costs seconds, batches are independent."""
    with Service.embedded(tmp_path_factory.mktemp("svc"), dg_model, max_batch_size=4, chunk_size=4) as service:
        yield service


def test_diffusion_gemma_batch_travels_the_service(dg_service):
    lines = [completion_line(f"c{i}", prompt="x = " * (i + 1), model=MODEL, max_tokens=8 + 10 * i, seed=i)
             for i in range(3)]
    lines.append(completion_line("ref", model=MODEL, max_tokens=20, diffusion={"sampler": "reference", "max_steps": 2}))
    batch = dg_service.wait(dg_service.submit(lines)["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    output = {line["custom_id"]: line["response"]["body"] for line in dg_service.lines_of(batch["output_file_id"])}
    assert sorted(output) == ["c0", "c1", "c2", "ref"]
    for body in output.values():
        assert body["model"] == MODEL and body["choices"][0]["finish_reason"] in ("stop", "length")
        stats = body["usage"]["diffusion"]
        assert stats["forward_passes"] >= 1 and stats["wall_time_s"] >= 0
    assert output["c0"]["usage"]["diffusion"]["forward_passes"] <= 4  # one canvas, at most 4 steps
    assert output["ref"]["usage"]["diffusion"]["forward_passes"] <= 2 * 2  # two canvases of 2 steps


def test_chat_batch(dg_service):
    batch = dg_service.wait(dg_service.submit([chat_line("a", model=MODEL)], endpoint="/v1/chat/completions")["id"])
    assert batch["status"] == "completed", batch
    [line] = dg_service.lines_of(batch["output_file_id"])
    assert line["response"]["body"]["choices"][0]["message"]["role"] == "assistant"


def test_unsupported_inputs_are_per_line_errors(dg_service):
    image = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    lines = [chat_line("ok", model=MODEL), chat_line("img", model=MODEL),
             chat_line("thr", model=MODEL, diffusion={"sampler": "threshold"}),
             chat_line("hot", model=MODEL, temperature=0.7)]
    lines[1]["body"]["messages"][0]["content"] = image
    batch = dg_service.wait(dg_service.submit(lines, endpoint="/v1/chat/completions")["id"])
    assert batch["status"] == "failed"
    errors = {error["line"]: error for error in batch["errors"]["data"]}
    assert sorted(errors) == [2, 3, 4]
    expected = {2: ("body.messages.0.content", "only text content parts are supported, got type 'image_url'"),
                3: ("body.diffusion.sampler", "diffusion.sampler 'threshold' does not apply to DiffusionGemma"),
                4: ("body.temperature", "temperature does not apply to DiffusionGemma")}
    for line, (param, message) in expected.items():
        assert errors[line]["param"] == param and message in errors[line]["message"], errors[line]
