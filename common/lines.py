"""The input line of a batch file and the bodies it may carry (OpenAI Batch API compatible, and the
`params` of Anthropic's Message Batches, stored as lines of url `/v1/messages`).

Every model forbids unknown fields: an option diffbatch does not implement is an error naming the field,
never silently ignored. `parse_line` turns one raw line into a `ParsedLine` or a `LineError` that names
the line and the field, the shape of OpenAI's `batch.errors.data[]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.json_schema import UnsupportedSchema, compile_schema
from common.samplers import SAMPLER_NAMES, SAMPLER_OPTIONS, SCHEDULES, option_samplers

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")  # OpenAI batches' endpoints
MESSAGES_URL = "/v1/messages"  # Anthropic's Message Batches (api/routes/message_batches.py)
LINE_URLS = (*ENDPOINTS, MESSAGES_URL)
# Anthropic checks each request's params when it runs: a bad one errors that request alone, the others run.
# So a line of these urls is checked at validation only as far as its envelope and model; the worker checks
# the rest (worker/responses.py: to_generation_request).
CHECKED_WHEN_RUN = frozenset({MESSAGES_URL})
FILL_MARKER = re.compile(r"\{\{fill:(\d+)\}\}")  # the engine's infill.py reads the same syntax


class DefaultsConflict(ValueError):
    """A request's diffusion options and the server's defaults do not fit together. ``param``: the
    field at fault as the engine names it (``diffusion.steps``), or None for the options as a whole."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_json_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Where a number is expected, only a JSON number: pydantic's lax mode would read true as 1
        and "0.5" as 0.5, which OpenAI's API refuses (16.0 for an integer stays accepted)."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, (bool, str)) and field is not None and _is_number_type(field.annotation):
            raise ValueError("must be a JSON number")
        return value


def _is_number_type(annotation: Any) -> bool:
    kinds = get_args(annotation) or (annotation,)  # int | None -> (int, NoneType)
    return any(kind in (int, float) for kind in kinds) and not any(kind in (str, bool) for kind in kinds)


class DiffusionOptions(_Strict):
    """Diffusion-specific options, all under `body.diffusion`.

    ``sampler`` and ``block_length`` left unset mean the served model's defaults (the block-causal
    models: reference and 32 unless the checkpoint's config.json names others, the built-in model's
    block 16; DiffusionGemma: entropy_bound, its canvas length).
    """

    sampler: Literal[SAMPLER_NAMES] | None = None  # type: ignore[valid-type]
    block_length: int | None = Field(None, ge=1, le=1024)
    steps: int | None = Field(None, ge=1, le=1024, description="denoising steps per block")
    schedule: Literal[SCHEDULES] | None = Field(  # type: ignore[valid-type]
        None, description="reference sampler: tokens per step, linear (LLaDA's) or maskgit_plus (Dream's)")

    threshold: float | None = Field(None, gt=0.0, le=1.0, description="threshold sampler: commit at this confidence")
    factor: float | None = Field(None, gt=0.0, description="factor sampler: (n + 1)(1 - c_n) < factor")
    # LLaDA2.1's token editing (README): generated tokens of the active block the model now predicts
    # otherwise, at this confidence, are replaced; then up to max_post_steps passes once it has no mask.
    editing_threshold: float | None = Field(None, gt=0.0, le=1.0,
                                            description="threshold sampler: edit at this confidence")
    max_post_steps: int | None = Field(None, ge=0, le=1024, description="with editing: passes after the last mask")

    # DiffusionGemma; unset = the checkpoint's generation_config.json.
    max_steps: int | None = Field(None, ge=1, le=1024, description="most denoising steps per canvas")
    entropy_bound: float | None = Field(None, gt=0.0, description="entropy_bound sampler: acceptance bound")
    t_min: float | None = Field(None, ge=0.0, le=10.0, description="temperature at the last denoising step")
    t_max: float | None = Field(None, gt=0.0, le=10.0, description="temperature at the first denoising step")

    # Infilling: fixed text with {{fill:N}} holes of N tokens, denoised after the prompt (README).
    template: str | None = Field(None, min_length=1, max_length=200_000)
    # /v1/completions: give the prompt's last token back so the model picks how it continues
    # (worker/engine/healing.py); false runs the prompt's tokens exactly as the tokenizer wrote them.
    token_healing: bool = True

    @field_validator("template")
    @classmethod
    def _template_has_holes(cls, template: str | None) -> str | None:
        if template is None:
            return None
        sizes = [int(n) for n in FILL_MARKER.findall(template)]
        if not sizes:
            raise ValueError("must contain at least one {{fill:N}} hole")
        if not all(1 <= n <= 1024 for n in sizes):
            raise ValueError("a {{fill:N}} hole holds 1 to 1024 tokens")
        return template

    @field_validator("steps")
    @classmethod
    def _steps_fit_block(cls, steps: int | None, info: ValidationInfo) -> int | None:
        # Against an unset block_length the worker checks, once the model's default is known.
        block = info.data.get("block_length")
        if steps is not None and block is not None and steps > block:
            raise ValueError(f"must be at most block_length ({block}): each step commits at least one token")
        return steps

    @model_validator(mode="after")
    def _options_match_sampler(self) -> DiffusionOptions:
        # An unset sampler is checked again once the model's default is known (with_default_sampler).
        # Whether an option fits the served model's family (the DiffusionGemma options also serve its
        # "reference" sampler) is the engine's check.
        for option, samplers in SAMPLER_OPTIONS.items():
            if getattr(self, option) is not None and self.sampler is not None and self.sampler not in samplers:
                names = " or ".join(repr(s) for s in option_samplers(option))
                raise ValueError(f"{option} applies to sampler {names}, not {self.sampler!r}")
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError("t_max must be greater than t_min")
        return self

    def with_server_defaults(self, defaults: DiffusionOptions | None) -> DiffusionOptions:
        """These options, the fields a request left unset taken from the server's ``defaults``
        (DIFFBATCH_DIFFUSION). The defaults' sampler options go with their sampler: a request that
        names another sampler gets none of them. DefaultsConflict naming the field if the two together
        do not fit (e.g. the request's steps beyond the server's block_length)."""
        if defaults is None:
            return self
        given, base = self.model_dump(exclude_unset=True), defaults.model_dump(exclude_unset=True)
        if given.get("sampler", base.get("sampler")) != base.get("sampler"):
            base = {name: value for name, value in base.items() if name != "sampler" and name not in SAMPLER_OPTIONS}
        try:
            return DiffusionOptions.model_validate({**base, **given})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in ("diffusion", *first["loc"]))
            raise DefaultsConflict(f"{where}: {first['msg']} (with this server's default diffusion options "
                                   f"{json.dumps(base)})", param=where if first["loc"] else None) from None

    def with_default_sampler(self, default: str) -> DiffusionOptions:
        """These options with an unset sampler replaced by the model's ``default``; ValueError (a
        pydantic ValidationError) if an option does not belong to that sampler."""
        if self.sampler is not None:
            return self
        return DiffusionOptions.model_validate({**self.model_dump(exclude_none=True), "sampler": default})


def _checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema outside the subset structured output supports (common/json_schema.py) is a line error
    naming what is unsupported, at upload, not a failed request later."""
    try:
        compile_schema(schema)
    except UnsupportedSchema as error:
        raise ValueError(str(error)) from None
    return schema


class JsonSchemaSpec(_Strict):
    """OpenAI's `json_schema` object: output that fits `schema`, written by infilling its skeleton."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # diffbatch's output always fits: strict or not

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _supported(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _checked_schema(schema)


class ResponseFormat(_Strict):
    """`response_format` of chat and (a diffbatch extension) completion lines. `json_object` (any JSON, no
    schema) has no skeleton to infill, so it is refused by name: give a json_schema."""

    type: Literal["text", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        if self.type == "text" and self.json_schema is not None:
            raise ValueError("json_schema applies to type 'json_schema' only")
        return self


class _SamplingBody(_Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = None
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions)
    response_format: ResponseFormat | None = None

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must fit (response_format json_schema), or None for free text."""
        spec = self.response_format.json_schema if self.response_format else None
        return spec.schema_ if spec else None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_SamplingBody):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, le=8192)  # OpenAI's default for /v1/completions

    def output_limit(self) -> int:
        return self.max_tokens


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[dict[str, Any]]) -> str:
        """Multimodal parts are out of scope: say so instead of dropping them."""
        if isinstance(content, str):
            return content
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
        return "".join(part["text"] for part in content)


class ChatBody(_SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)

    def output_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    def chat_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _only_text_parts(content: Any, kinds: tuple[str, ...]) -> Any:
    """Before the parts are parsed: a part of another type (an image, a file, a tool result) is an error
    naming its type, since multimodal and tool content are out of scope and never silently dropped."""
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") not in kinds:
                raise ValueError(f"only {' and '.join(kinds)} content parts are supported, got type "
                                 f"{part.get('type')!r}")
    return content


def _text_or(parts: Any) -> Any:
    """``str | parts``, the branch chosen by the value's JSON type: an error then comes from that branch alone
    (pydantic's plain union reports the string branch's "should be a valid string" for a bad list)."""
    return Annotated[Annotated[str, Tag("str")] | Annotated[parts, Tag("list")],
                     Discriminator(lambda value: "str" if isinstance(value, str) else "list")]


# ------------------------------------------------------------------------------ /v1/responses


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """An earlier answer's text, as a message of `response.output` carries it when passed back as input."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class ResponsesMessage(_Strict):
    """An input item of OpenAI's Responses API: a message (`type` "message" may be given or left out),
    or an assistant message of an earlier response's output, passed back as it came (`id`, `status`)."""

    type: Literal["message"] | None = None
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: _text_or(list[InputText | OutputText])  # type: ignore[valid-type]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _only_text_parts(content, ("input_text", "output_text"))

    @model_validator(mode="after")
    def _output_text_is_the_assistants(self) -> ResponsesMessage:
        if self.role != "assistant" and not isinstance(self.content, str) and any(
                part.type == "output_text" for part in self.content):
            raise ValueError(f"output_text parts belong to assistant messages, not {self.role!r} ones")
        return self

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(_Strict):
    """`text.format` of a Responses body: plain text, or output that fits a JSON schema (the Responses API
    puts json_schema's fields in the format itself). `json_object` is refused by name, as for chat."""

    type: Literal["text", "json_schema"]
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _supported(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if schema is None else _checked_schema(schema)

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError("type 'json_schema' needs name and schema")
        if self.type == "text" and (self.schema_ is not None or self.name is not None):
            raise ValueError("name and schema apply to type 'json_schema' only")
        return self


class TextOptions(_Strict):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ResponsesBody(_Strict):
    """A `/v1/responses` line's body: text in, one output message out. Tools, reasoning, conversation
    state (previous_response_id) and streaming are refused by name (unknown fields are errors)."""

    model: str = Field(min_length=1)
    input: _text_or(list[ResponsesMessage])  # type: ignore[valid-type]
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    text: TextOptions | None = None
    metadata: dict[str, str] | None = None  # accepted; not echoed in the Response
    store: bool | None = None  # accepted; a batch's responses are kept in its output file, not by id
    user: str | None = None
    stream: Literal[False] = False
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[ResponsesMessage]) -> str | list[ResponsesMessage]:
        if not value:
            raise ValueError("must not be empty")
        return value

    def output_limit(self) -> int:
        return self.max_output_tokens or 256  # chat's default

    def json_schema(self) -> dict[str, Any] | None:
        return self.text.format.schema_ if self.text else None

    def stop_list(self) -> list[str]:
        return []  # the Responses API has no stop sequences

    def chat_messages(self) -> list[dict[str, Any]]:
        items = [ResponsesMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        system = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        return system + [{"role": m.role, "content": m.text()} for m in items]


# ------------------------------------------------------------------------------ /v1/messages


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a prompt-caching hint: accepted, changes nothing here


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: _text_or(list[TextBlock])  # type: ignore[valid-type]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _only_text_parts(content, ("text",))

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class AnthropicMetadata(_Strict):
    user_id: str | None = Field(None, max_length=256)


class MessagesBody(_Strict):
    """The `params` of one request of an Anthropic Message Batch (a Messages API body). Tools, thinking,
    top_k, streaming and the rest are refused by name, per request (CHECKED_WHEN_RUN)."""

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=8192)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: _text_or(list[TextBlock]) | None = None  # type: ignore[valid-type]
    temperature: float = Field(0.0, ge=0.0, le=1.0)  # diffbatch's default 0 (deterministic), not Anthropic's 1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    metadata: AnthropicMetadata | None = None
    stream: Literal[False] = False
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions)

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[AnthropicMessage]) -> list[AnthropicMessage]:
        # Anthropic continues a final assistant turn (prefill); the chat template here opens a new turn,
        # so such a request would silently mean something else.
        if messages and messages[-1].role != "user":
            raise ValueError("the last message must have role 'user': continuing an assistant turn (prefill) "
                             "is not supported")
        return messages

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def output_limit(self) -> int:
        return self.max_tokens

    def json_schema(self) -> dict[str, Any] | None:
        return None  # Anthropic's structured outputs are not part of Message Batches' params here

    def stop_list(self) -> list[str]:
        return list(self.stop_sequences or [])

    def chat_messages(self) -> list[dict[str, Any]]:
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or [])
        first = [{"role": "system", "content": system}] if self.system is not None else []
        return first + [{"role": m.role, "content": m.text()} for m in self.messages]


class _Line(_Strict):
    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Literal[LINE_URLS]  # type: ignore[valid-type]
    body: dict[str, Any]

    @field_validator("custom_id")
    @classmethod
    def _no_nul(cls, custom_id: str) -> str:
        if "\x00" in custom_id:  # PostgreSQL's text cannot hold it
            raise ValueError("must not contain the NUL character (\\u0000)")
        return custom_id


Body = CompletionBody | ChatBody | ResponsesBody | MessagesBody
BODY_FOR_URL: dict[str, type[Body]] = {
    "/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody, "/v1/responses": ResponsesBody,
    MESSAGES_URL: MessagesBody}


class _ModelOnly(BaseModel):
    """What validation checks of a CHECKED_WHEN_RUN body: a model to route it by (other fields: the worker's)."""

    model: str = Field(min_length=1, strict=True)  # other fields are ignored here


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]  # the validated body as sent (unset fields left out), as stored with the request
    model: str


@dataclass(frozen=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


def parse_body(url: str, body: dict[str, Any]) -> Body:
    return BODY_FOR_URL[url].model_validate(body)


def body_error(exc: ValidationError) -> tuple[str | None, str]:
    """The body field a validation error names (None: the body as a whole) and pydantic's message."""
    first = exc.errors(include_url=False)[0]
    return _field(first["loc"]), first["msg"]


def output_limit(url: str, body: dict[str, Any]) -> int:
    """The most tokens a stored line's request may generate; 0 for a body the worker will refuse."""
    try:
        return parse_body(url, body).output_limit()
    except ValidationError:  # only a CHECKED_WHEN_RUN body gets this far unchecked
        return 0


def _not_json(constant: str) -> None:
    """Python's json reads NaN and Infinity; JSON has no such numbers, and PostgreSQL's json column
    refuses them, so a line holding one would fail every try at storing its batch."""
    raise ValueError(f"{constant} is not a JSON number")


def parse_line(raw: bytes, line: int) -> ParsedLine | LineError:
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not an error
    except UnicodeDecodeError as exc:
        return LineError(line, "invalid_encoding", f"Line {line}: not valid UTF-8 (byte {exc.start}).")
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        return LineError(line, "invalid_json_line", f"Line {line}: not valid JSON: {exc.msg}.")
    except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits; nesting past the stack
        return LineError(line, "invalid_json_line", f"Line {line}: not valid JSON here: {exc}.")
    if not isinstance(data, dict):
        return LineError(line, "invalid_json_line", f"Line {line}: must be a JSON object.")
    try:
        envelope = _Line.model_validate(data)
    except ValidationError as exc:
        return _from_validation_error(exc, line, prefix="")
    if envelope.url in CHECKED_WHEN_RUN:
        try:
            model = _ModelOnly.model_validate(envelope.body).model
        except ValidationError as exc:
            return _from_validation_error(exc, line, prefix="body.")
        return ParsedLine(line=line, custom_id=envelope.custom_id, url=envelope.url, body=envelope.body, model=model)
    try:
        body = parse_body(envelope.url, envelope.body)
    except ValidationError as exc:
        return _from_validation_error(exc, line, prefix="body.")
    # Stored as sent (validated, unset fields left out): a default filled in here would read as set
    # when the worker parses the body again, and win over the server's DIFFBATCH_DIFFUSION.
    return ParsedLine(line=line, custom_id=envelope.custom_id, url=envelope.url,
                      body=body.model_dump(mode="json", exclude_unset=True, by_alias=True), model=body.model)


# The names pydantic gives the branches of a union in an error's location (`stop` is str | list[str]):
# not fields, so they stay out of the field a line error names.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|dict|list|none|function-[a-z]+)(\[.*\])?$")


def _field(loc: tuple[int | str, ...]) -> str | None:
    where = [str(part) for part in loc if not _UNION_BRANCH.match(str(part))]
    return ".".join(where) or None


def _from_validation_error(exc: ValidationError, line: int, prefix: str) -> LineError:
    first = exc.errors(include_url=False)[0]
    field = _field(first["loc"])
    param = prefix + field if field else None
    kind = first["type"]
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(
        kind, "invalid_value")
    if param == "url" and kind != "missing":
        code = "invalid_url"
    return LineError(line, code, f"Line {line}: {param}: {first['msg']}.", param)
