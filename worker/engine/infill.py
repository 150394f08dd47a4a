"""Infilling templates: fixed text with holes, the canvas a diffusion model denoises in place.

A template is text with ``{{fill:N}}`` markers, each a hole of N tokens. The generation canvas
holds the fixed text's tokens where the template has text and [MASK] where it has holes, so the
samplers (which only ever commit masked positions) fill the holes and leave the text alone. An
autoregressive API cannot do this; a masked diffusion model does it natively (LLaDA §2.4,
arXiv:2502.09992). What a hole can see depends on the attention family: full-attention models see
the whole template; block-causal models see text in the same and earlier blocks only.
"""

from __future__ import annotations

import re

from .params import InvalidRequest

FILL_MARKER = re.compile(r"\{\{fill:(\d+)\}\}")
MAX_HOLE = 1024


def encode_template(tokenizer, template: str) -> list[int | None]:
    """Canvas of the template: token ids for the fixed text, None for each hole position. Fixed segments
    are tokenised one by one (no special tokens), so a hole never merges with its neighbours' text."""
    if not isinstance(template, str):
        raise InvalidRequest("diffusion.template must be a string", param="diffusion.template")
    canvas: list[int | None] = []
    position = 0
    for marker in FILL_MARKER.finditer(template):
        canvas += _encode(tokenizer, template[position : marker.start()])
        size = int(marker.group(1))
        if not 1 <= size <= MAX_HOLE:
            raise InvalidRequest(f"diffusion.template: a hole holds 1 to {MAX_HOLE} tokens, got {{{{fill:{size}}}}}",
                                 param="diffusion.template")
        canvas += [None] * size
        position = marker.end()
    canvas += _encode(tokenizer, template[position:])
    if None not in canvas:
        raise InvalidRequest("diffusion.template has no {{fill:N}} hole", param="diffusion.template")
    return canvas


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
