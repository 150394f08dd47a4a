"""DIFFBATCH_DIFFUSION: the server's diffusion options for what a request leaves unset, so clients
that send plain OpenAI bodies get the decoding the operator chose (e.g. LLaDA2.1's editing)."""

from __future__ import annotations

import pytest

from common.lines import DiffusionOptions
from common.settings import Settings
from tests.harness import Service, completion_line

SERVER = {"sampler": "threshold", "threshold": 0.3, "block_length": 4}


def merged(request: dict, server: dict = SERVER) -> dict:
    options = DiffusionOptions.model_validate(request).with_server_defaults(DiffusionOptions.model_validate(server))
    return options.model_dump(exclude_unset=True)


def test_unset_fields_take_the_servers_and_its_sampler_options_go_with_its_sampler():
    assert merged({}) == SERVER
    assert merged({"threshold": 0.8}) == {**SERVER, "threshold": 0.8}
    assert merged({"sampler": "threshold"}) == SERVER
    # Another sampler keeps the server's block but none of its threshold options.
    assert merged({"sampler": "reference", "steps": 2}) == {"sampler": "reference", "steps": 2, "block_length": 4}
    assert merged({"sampler": "factor"}) == {"sampler": "factor", "block_length": 4}
    editing = {"sampler": "threshold", "threshold": 0.7, "editing_threshold": 0.5}
    assert merged({"max_post_steps": 4}, editing) == {**editing, "max_post_steps": 4}


def test_a_request_that_does_not_fit_the_servers_options_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"diffusion\.steps: .*block_length \(4\).*server's default"):
        merged({"steps": 8})


def test_an_engine_refusal_names_the_servers_options(tiny_model):
    """Options that fit the wire format but not the served model read as the server's, not the client's."""
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model
    from worker.responses import to_generation_request

    engine = Engine(load_model(str(tiny_model)))
    body = completion_line("x")["body"]
    server = DiffusionOptions.model_validate({"sampler": "threshold", "editing_threshold": 0.5})
    with pytest.raises(ValueError, match=r"does not combine with frequency_penalty.*server's default diffusion"):
        to_generation_request(engine, "/v1/completions", {**body, "presence_penalty": 0.5}, server)
    assert to_generation_request(engine, "/v1/completions", body, server).params.editing_threshold == 0.5
    tuned = to_generation_request(engine, "/v1/completions", {**body, "diffusion": {"max_post_steps": 3}}, server)
    assert (tuned.params.editing_threshold, tuned.params.max_post_steps) == (0.5, 3)
    with pytest.raises(ValueError, match="diffusion.max_post_steps applies with diffusion.editing_threshold only"):
        to_generation_request(engine, "/v1/completions", {**body, "diffusion": {"sampler": "threshold",
                                                                                "max_post_steps": 3}})


def test_the_variable_is_json_and_bad_options_are_refused_at_startup(monkeypatch):
    monkeypatch.setenv("DIFFBATCH_DIFFUSION", '{"sampler": "threshold", "threshold": 0.7, "editing_threshold": 0.5}')
    assert Settings().diffusion_defaults.editing_threshold == 0.5
    for value, named in [('{"sampler": "threshold", "threshold": 1.5}', "threshold"),
                         ('{"sampler": "reference", "editing_threshold": 0.5}', "editing_threshold applies"),
                         ('{"template": "x = {{fill:2}}"}', "template")]:
        monkeypatch.setenv("DIFFBATCH_DIFFUSION", value)
        with pytest.raises(ValueError, match=f"DIFFBATCH_DIFFUSION: .*{named}"):
            Settings()


def test_the_worker_applies_them_to_plain_bodies(tmp_path, tiny_model):
    """Through the service: a plain line decodes as one naming the server's options, and not as one
    naming others; a line whose steps exceed the server's block fails validation naming the field."""
    with Service.embedded(tmp_path, tiny_model, diffusion=SERVER) as service:
        lines = [completion_line("plain", max_tokens=12), completion_line("named", max_tokens=12, diffusion=SERVER),
                 completion_line("other", max_tokens=12, diffusion={"sampler": "reference", "block_length": 32})]
        batch = service.wait(service.submit(lines)["id"])
        assert batch["status"] == "completed", batch
        out = {line["custom_id"]: line["response"]["body"] for line in service.lines_of(batch["output_file_id"])}
        assert out["plain"]["choices"] == out["named"]["choices"]
        passes = {name: body["usage"]["diffusion"]["forward_passes"] for name, body in out.items()}
        assert passes["plain"] == passes["named"]
        assert out["plain"]["choices"] != out["other"]["choices"]

        failed = service.wait(service.submit([completion_line("long steps", diffusion={"steps": 8})])["id"])
        error = failed["errors"]["data"][0]
        assert failed["status"] == "failed" and error["param"] == "body.diffusion.steps", error


def test_a_server_default_that_turns_token_healing_off_holds_for_plain_lines(tmp_path):
    """The stored body keeps only what the line set: token_healing's own default (true) written into
    it would win over the server's false. (The built-in model: its byte-level BPE heals.)"""
    from common.settings import BUILTIN_MODEL_PATH

    with Service.embedded(tmp_path, BUILTIN_MODEL_PATH, diffusion={"token_healing": False}) as service:
        prompt, model = "def fib(n):\n", service.runtime.model_name
        lines = [completion_line("plain", prompt=prompt, max_tokens=4, model=model),
                 completion_line("off", prompt=prompt, max_tokens=4, model=model, diffusion={"token_healing": False}),
                 completion_line("on", prompt=prompt, max_tokens=4, model=model, diffusion={"token_healing": True})]
        batch = service.wait(service.submit(lines)["id"])
        assert batch["status"] == "completed", batch
        prompt_tokens = {line["custom_id"]: line["response"]["body"]["usage"]["prompt_tokens"]
                         for line in service.lines_of(batch["output_file_id"])}
        # Healing gives the prompt's last token back to the completion.
        assert prompt_tokens["plain"] == prompt_tokens["off"] == prompt_tokens["on"] + 1, prompt_tokens
