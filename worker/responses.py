"""Engine inputs from request bodies, and OpenAI response bodies from engine results."""

from __future__ import annotations

import dataclasses
from typing import Any

from common.ids import new_id, now
from common.lines import CompletionBody, DefaultsConflict, DiffusionOptions, parse_body
from worker.engine.interface import GenerationEngine
from worker.engine.params import (
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    SamplingParams,
)


def to_generation_request(engine: GenerationEngine, url: str, body: dict[str, Any],
                          defaults: DiffusionOptions | None = None) -> GenerationRequest:
    """Raise ValueError (a per-line error; InvalidRequest where a field is at fault) if the body cannot
    run on this engine. ``defaults``: the server's diffusion options for what the body leaves unset
    (Settings.diffusion_defaults); then the checkpoint's sampler and block."""
    parsed = parse_body(url, body)
    try:
        merged = parsed.diffusion.with_server_defaults(defaults)
    except DefaultsConflict as error:
        raise InvalidRequest(str(error), param=error.param) from None
    options = merged.with_default_sampler(engine.default_sampler)
    healing = None
    if isinstance(parsed, CompletionBody):
        prompt_ids, max_tokens = engine.encode_completion(parsed.prompt), parsed.max_tokens
        if options.token_healing and options.template is None:
            prompt_ids, healing = engine.heal(prompt_ids)
    else:
        messages = [{"role": m.role, "content": m.content} for m in parsed.messages]
        prompt_ids, max_tokens = engine.encode_chat(messages), parsed.output_limit()
    chosen = {name: value for name in ("schedule", "threshold", "factor", "editing_threshold", "max_post_steps",
                                       "max_steps", "entropy_bound", "t_min", "t_max")
              if (value := getattr(options, name)) is not None}
    block_length = engine.default_block_length if options.block_length is None else options.block_length
    params = SamplingParams(max_tokens=max_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
                            frequency_penalty=parsed.frequency_penalty, presence_penalty=parsed.presence_penalty,
                            stop=tuple(parsed.stop_list()), seed=parsed.seed,
                            sampler=options.sampler or engine.default_sampler,  # with_default_sampler set it
                            block_length=block_length, steps=options.steps, **chosen)
    template_ids = None
    if options.template is not None:
        if parsed.stop_list():
            raise InvalidRequest("stop does not apply with diffusion.template (the template sets the length)",
                                 param="stop")
        template_ids = engine.encode_template(options.template)
        params = dataclasses.replace(params, max_tokens=len(template_ids))  # the template sets the length
    request = GenerationRequest(prompt_ids=prompt_ids, params=params, template_ids=template_ids, healing=healing)
    try:
        engine.check(request)
    except ValueError as error:
        if defaults is None or isinstance(error, ContextLengthError):
            raise
        # The operator's options may be what does not fit this model: say so, or it reads as the client's.
        raise InvalidRequest(f"{error} (with this server's default diffusion options "
                             f"{defaults.model_dump_json(exclude_unset=True)})",
                             param=error.param if isinstance(error, InvalidRequest) else None) from None
    return request


def error_code_and_param(error: ValueError, url: str) -> tuple[str, str]:
    """How a request the engine refused is reported: OpenAI's code and the body field at fault."""
    prompt = "body.prompt" if url == "/v1/completions" else "body.messages"  # a chat's prompt is its messages
    if isinstance(error, ContextLengthError):
        return "context_length_exceeded", prompt
    field = error.param if isinstance(error, InvalidRequest) else None
    return "invalid_request", prompt if field == "prompt" else f"body.{field}" if field else "body"


def usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        # diffbatch extension: what the denoiser spent on this request.
        "diffusion": {"forward_passes": result.forward_passes,
                      "tokens_per_forward": round(result.completion_tokens / max(result.forward_passes, 1), 3),
                      "wall_time_s": round(result.elapsed_s, 4)},
    }


def response_body(url: str, model: str, result: GenerationResult) -> dict[str, Any]:
    if url == "/v1/completions":
        return {"id": new_id("cmpl-"), "object": "text_completion", "created": now(), "model": model,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": usage(result)}
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}
