"""Engine inputs from request bodies, and response bodies from engine results: OpenAI's completion, chat
completion and Response objects, and Anthropic's Message."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from common.ids import new_id, now
from common.lines import (
    MESSAGES_URL,
    ChatBody,
    CompletionBody,
    DefaultsConflict,
    DiffusionOptions,
    body_error,
    parse_body,
)
from worker.engine.interface import GenerationEngine
from worker.engine.params import (
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    SamplingParams,
)

RESPONSES_URL = "/v1/responses"
# The body field holding each endpoint's prompt: where a context-length error points.
PROMPT_FIELD = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", RESPONSES_URL: "input",
                MESSAGES_URL: "messages"}
# The engine names the fields of /v1/completions and /v1/chat/completions; other endpoints call some otherwise.
LIMIT_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "max_output_tokens"})  # a client's own limit
RENAMED_FIELDS = {RESPONSES_URL: {"max_tokens": "max_output_tokens", "response_format": "text.format"},
                  MESSAGES_URL: {"stop": "stop_sequences"}}


def to_generation_request(engine: GenerationEngine, url: str, body: dict[str, Any],
                          defaults: DiffusionOptions | None = None) -> GenerationRequest:
    """Raise ValueError (a per-line error; InvalidRequest where a field is at fault) if the body cannot
    run on this engine. ``defaults``: the server's diffusion options for what the body leaves unset
    (Settings.diffusion_defaults); then the checkpoint's sampler and block."""
    try:
        parsed = parse_body(url, body)
    except ValidationError as error:  # a CHECKED_WHEN_RUN body (/v1/messages) is first checked here
        field, message = body_error(error)
        raise InvalidRequest(message, param=field) from None
    try:
        merged = parsed.diffusion.with_server_defaults(defaults)
    except DefaultsConflict as error:
        raise InvalidRequest(str(error), param=error.param) from None
    options = merged.with_default_sampler(engine.default_sampler)
    healing, schema = None, parsed.json_schema()
    if isinstance(parsed, CompletionBody):
        prompt_ids = engine.encode_completion(parsed.prompt)
        # A skeleton's fixed text follows the prompt as it was written: no token to give back.
        if options.token_healing and options.template is None and schema is None:
            prompt_ids, healing = engine.heal(prompt_ids)
    else:
        prompt_ids = engine.encode_chat(parsed.chat_messages())
    chosen = {name: value for name in ("schedule", "threshold", "factor", "editing_threshold", "max_post_steps",
                                       "max_steps", "entropy_bound", "t_min", "t_max")
              if (value := getattr(options, name)) is not None}
    openai = parsed if isinstance(parsed, CompletionBody | ChatBody) else None  # the bodies with penalties, seed
    stop = tuple(parsed.stop_list())
    block_length = engine.default_block_length if options.block_length is None else options.block_length
    steps = options.steps
    if steps is None and merged.sampler is None and engine.default_steps is not None:  # nobody named a sampler
        # The checkpoint's tokens a pass, kept on a block of another length (ceil: never more a pass).
        steps = -(-block_length * engine.default_steps // engine.default_block_length)
    params = SamplingParams(max_tokens=parsed.output_limit(), temperature=parsed.temperature, top_p=parsed.top_p,
                            frequency_penalty=openai.frequency_penalty if openai else 0.0,
                            presence_penalty=openai.presence_penalty if openai else 0.0,
                            stop=stop, seed=openai.seed if openai else None,
                            sampler=options.sampler or engine.default_sampler,  # with_default_sampler set it
                            block_length=block_length, steps=steps, **chosen)
    template_ids = None
    if options.template is not None:
        if stop:
            raise InvalidRequest("stop does not apply with diffusion.template (the template sets the length)",
                                 param="stop")
        template_ids = engine.encode_template(options.template)
        params = dataclasses.replace(params, max_tokens=len(template_ids))  # the template sets the length
    request = GenerationRequest(prompt_ids=prompt_ids, params=params, template_ids=template_ids, healing=healing)
    if schema is not None:  # JSON that fits the schema, by infilling its skeleton
        from worker.structured_output import structured_request  # its masks are torch tensors: loaded when used

        request = structured_request(engine, schema, request)
        needed, limit_set = request.params.max_tokens, LIMIT_FIELDS & parsed.model_fields_set
        if limit_set and parsed.output_limit() < needed:  # the document would be cut, so invalid
            raise InvalidRequest(f"response_format's schema takes {needed} tokens, more than the output limit "
                                 f"{parsed.output_limit()}: raise it or leave it unset", param=min(limit_set))
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
    """How a request the engine refused is reported: OpenAI's code and the field at fault, named as the
    client sent it (`body.` in an input line; `params.` in an Anthropic Message Batch request)."""
    where = "params" if url == MESSAGES_URL else "body"
    prompt = f"{where}.{PROMPT_FIELD[url]}"
    if isinstance(error, ContextLengthError):
        return "context_length_exceeded", prompt
    field = error.param if isinstance(error, InvalidRequest) else None
    if field == "prompt":
        return "invalid_request", prompt
    if field is None:
        return "invalid_request", where
    head, dot, rest = field.partition(".")
    return "invalid_request", f"{where}.{RENAMED_FIELDS.get(url, {}).get(head, head)}{dot}{rest}"


def _diffusion_usage(result: GenerationResult) -> dict[str, Any]:
    """diffbatch extension: what the denoiser spent on this request."""
    return {"forward_passes": result.forward_passes,
            "tokens_per_forward": round(result.completion_tokens / max(result.forward_passes, 1), 3),
            "wall_time_s": round(result.elapsed_s, 4)}


def usage(result: GenerationResult) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens, "diffusion": _diffusion_usage(result)}


def response_body(url: str, model: str, result: GenerationResult) -> dict[str, Any]:
    if url == "/v1/completions":
        return {"id": new_id("cmpl-"), "object": "text_completion", "created": now(), "model": model,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": usage(result)}
    if url == RESPONSES_URL:
        return _response_object(model, result)
    if url == MESSAGES_URL:
        return _anthropic_message(model, result)
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def _response_object(model: str, result: GenerationResult) -> dict[str, Any]:
    """OpenAI's Response object (the fields openai.types.responses.Response requires, and its usage),
    one output message. The request's own parameters are not echoed."""
    cut = result.finish_reason == "length"
    status = "incomplete" if cut else "completed"
    return {
        "id": new_id("resp_"), "object": "response", "created_at": now(), "status": status,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "model": model,
        "output": [{"type": "message", "id": new_id("msg_"), "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": result.text, "annotations": []}]}],
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [],  # no tools here
        "usage": {"input_tokens": result.prompt_tokens,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},  # no prompt cache
                  "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": result.prompt_tokens + result.completion_tokens,
                  "diffusion": _diffusion_usage(result)},
    }


def _anthropic_message(model: str, result: GenerationResult) -> dict[str, Any]:
    """Anthropic's Message (anthropic.types.Message): one text block, the stop reason and usage."""
    if result.finish_reason == "length":
        stop_reason = "max_tokens"
    else:
        stop_reason = "end_turn" if result.stop_sequence is None else "stop_sequence"
    return {
        "id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": result.text}],
        "stop_reason": stop_reason, "stop_sequence": result.stop_sequence if stop_reason == "stop_sequence" else None,
        "usage": {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "service_tier": "batch",
                  "diffusion": _diffusion_usage(result)},
    }
