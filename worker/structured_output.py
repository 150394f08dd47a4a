"""Structured output for the worker: a JSON schema -> a request whose completion is valid JSON by construction.

``common/json_schema.py`` compiles the schema to a skeleton (fixed text, typed holes); this module
translates it into the engine's terms (``worker/engine/structured.py``), which lay it out as an infilling
canvas with each hole position bound to its tokens, and attaches the skeleton's ``render`` so the result's
text is the JSON document written from the filled holes.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any

from common import json_schema as js
from worker.engine.interface import GenerationEngine
from worker.engine.params import GenerationRequest, InvalidRequest
from worker.engine.structured import DIGITS, MINUS, TEXT, ChoiceHole, ClassHole, Piece, StructuredOutput

PARAM = "response_format"


def structured_request(engine: GenerationEngine, schema: Any, request: GenerationRequest) -> GenerationRequest:
    """``request`` answered with JSON that fits ``schema``: its completion is the schema's canvas (max_tokens
    its length). InvalidRequest naming ``response_format`` for a schema outside the supported subset or a
    model that cannot infill; a request with a template, stop strings or token healing is refused too."""
    if request.template_ids is not None:
        raise InvalidRequest("diffusion.template does not apply with response_format", param="diffusion.template")
    if request.params.stop:
        raise InvalidRequest("stop does not apply with response_format json_schema (the schema sets the length)",
                             param="stop")
    if request.healing is not None:  # the prompt lost its last token for it: no way to give it back here
        raise InvalidRequest("diffusion.token_healing does not apply with response_format",
                             param="diffusion.token_healing")
    try:
        skeleton = _compiled(json.dumps(schema))
    except js.UnsupportedSchema as error:
        raise InvalidRequest(f"{PARAM}: {error}", param=PARAM) from None
    canvas = engine.encode_structured(engine_pieces(skeleton))
    params = dataclasses.replace(request.params, max_tokens=len(canvas.template))
    return dataclasses.replace(request, params=params, template_ids=canvas.template,
                               structured=StructuredOutput(canvas=canvas, render=skeleton.render))


@lru_cache(maxsize=256)
def _compiled(schema_json: str) -> js.Skeleton:
    """Compiled once per schema (a batch's lines mostly share one), keyed by its JSON text as given: the
    order of its properties is the order the keys are written in."""
    return js.compile_schema(json.loads(schema_json))


def engine_pieces(skeleton: js.Skeleton) -> tuple[Piece, ...]:
    """The skeleton in the engine's terms: each hole's positions as token classes (common/json_schema.py
    says what each may hold)."""
    pieces: list[Piece] = []
    for piece in skeleton.pieces:
        if isinstance(piece, js.Text):
            pieces.append(piece.text)
        elif isinstance(piece, js.StringHole):
            pieces.append(ClassHole(TEXT, piece.size, required=piece.min_chars))
        elif isinstance(piece, js.SignHole):
            pieces.append(ClassHole(MINUS, piece.size))
        elif isinstance(piece, js.DigitsHole):
            pieces.append(ClassHole(DIGITS, piece.size, required=1))
        else:
            pieces.append(ChoiceHole(piece.choices))
    return tuple(pieces)
