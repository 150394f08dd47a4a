"""Structured output: fixed text and typed holes -> a template canvas whose hole positions may take only
the tokens of their class.

The caller (worker/structured_output.py, from a JSON schema) describes a skeleton in this module's plain
terms: text, ``ClassHole`` (positions drawn from a token class: JSON-string text, digits, a minus sign)
and ``ChoiceHole`` (spell one of a few texts). ``encode_structured`` lays it out like an infilling
template (infill.py: token ids for the text, None in the holes) and gives each hole position a row of a
small table of vocabulary masks, so a request holds (classes x V) booleans, not (positions x V). Where
a position is bound, every other token's logit is -inf before x0 and its confidence are taken
(sampling/predict.py), whatever the sampler and cache. A hole's pad is the model's EOS: a template's EOS
ends nothing (schedulers/base.py) and is left out of the hole's text.

Binding one position to a token set is how token healing binds the first token (healing.py); logit
masks per position are also how grammar-constrained decoding works for autoregressive models (as in the
outlines and guidance libraries). A denoiser fills all holes in parallel, so here each position's set is
fixed in advance instead of following what was generated before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .params import InvalidRequest

TEXT, DIGITS, MINUS = "text", "digits", "minus"
TOKEN_CLASSES = (TEXT, DIGITS, MINUS)
MAX_HOLE = 1024
PARAM = "response_format"
CONTROL = frozenset(chr(c) for c in range(0x20))


@dataclass(frozen=True)
class ClassHole:
    """``size`` positions of one token class; the first ``required`` may not hold the pad, and a required
    text position holds a character other than whitespace."""

    token_class: str  # one of TOKEN_CLASSES
    size: int
    required: int = 0


@dataclass(frozen=True)
class ChoiceHole:
    """Positions that spell one of ``choices``: position i takes the i-th token of any choice (the pad
    where a choice is shorter). Which choice the tokens name is the caller's to read."""

    choices: tuple[str, ...]


Piece = str | ClassHole | ChoiceHole


@dataclass(eq=False)
class StructuredCanvas:
    """A skeleton laid out for one tokenizer: the template (token ids; None in holes), the masks table
    (C, V) bool and each template position's row in it (``classes``, -1 for fixed text)."""

    template: list[int | None]
    masks: torch.Tensor  # (C, V) bool, on the CPU
    classes: torch.Tensor  # (len(template),) long
    holes: tuple[tuple[int, int], ...]  # each hole's [start, end) in the template
    pad_ids: frozenset[int]  # what a hole may pad with (the EOS ids), left out of its text
    _device_masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def masks_on(self, device: torch.device) -> torch.Tensor:
        """The masks table on ``device``, copied there once (requests of one schema share this canvas)."""
        key = str(device)
        if key not in self._device_masks:
            self._device_masks[key] = self.masks.to(device)
        return self._device_masks[key]

    def hole_texts(self, tokenizer, token_ids: list[int]) -> list[str]:
        """Each hole's text in a completion's ``token_ids`` (the template's length), pad left out."""
        return [tokenizer.decode([t for t in token_ids[start:end] if t not in self.pad_ids],
                                 skip_special_tokens=False, clean_up_tokenization_spaces=False)
                for start, end in self.holes]


@dataclass(frozen=True)
class StructuredOutput:
    """A request's structured output: its canvas, and how the holes' texts become the completion's text."""

    canvas: StructuredCanvas
    render: Callable[[list[str]], str]  # each hole's text, in order -> the text the caller gets (a JSON document)


class TokenClasses:
    """The vocabulary sorted into the classes a hole position draws from, once per tokenizer (decoding a
    262K vocabulary takes a while). A token's spelling is read after a plain letter, so a SentencePiece
    token's leading space counts as it will in the middle of a value."""

    def __init__(self, tokenizer, vocab_size: int, excluded: set[int], pad_id: int):
        self.vocab_size, self.pad_id = vocab_size, pad_id
        spellings = _spellings(tokenizer, vocab_size, excluded)
        text = [bool(s) and '"' not in s and "\\" not in s and "\ufffd" not in s and not CONTROL.intersection(s)
                for s in spellings]
        self.sets = {
            (TEXT, False): text,
            (TEXT, True): [ok and bool(s.strip()) for ok, s in zip(text, spellings, strict=True)],
            (DIGITS, False): [bool(s) and all("0" <= c <= "9" for c in s) for s in spellings],
            (MINUS, False): [s == "-" for s in spellings],
        }
        self.sets[(DIGITS, True)] = self.sets[(DIGITS, False)]
        self.sets[(MINUS, True)] = self.sets[(MINUS, False)]

    def mask(self, token_class: str, required: bool) -> torch.Tensor:
        """(V,) bool: the tokens a position of ``token_class`` may hold, the pad too unless ``required``."""
        mask = torch.tensor(self.sets[(token_class, required)], dtype=torch.bool)
        if not required:
            mask[self.pad_id] = True
        return mask


def _spellings(tokenizer, vocab_size: int, excluded: set[int]) -> list[str]:
    """Each id's text after the anchor letter "a" ("" for excluded ids and ids the tokenizer lacks: no
    class takes an empty token)."""
    anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    known = min(len(tokenizer), vocab_size)
    decoded = tokenizer.batch_decode([[*anchor, i] for i in range(known)], clean_up_tokenization_spaces=False)
    spellings = [text[len(prefix):] if text.startswith(prefix) and i not in excluded else ""
                 for i, text in enumerate(decoded)]
    return spellings + [""] * (vocab_size - known)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as plain text: a key or choice that spells a special token stays text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_structured(tokenizer, classes: TokenClasses, pieces: Sequence[Piece],
                      mask_token_id: int) -> StructuredCanvas:
    """Lay ``pieces`` out: text tokenised a run at a time (adjacent strings joined), holes as None, and each
    hole position's mask. InvalidRequest (``response_format``) if a hole cannot be filled with this vocabulary."""
    rows: dict[tuple, int] = {}
    masks: list[torch.Tensor] = []

    def row(key: tuple, make: Callable[[], torch.Tensor], what: str) -> int:
        if key not in rows:
            mask = make()
            mask[mask_token_id] = False
            if not mask.any():
                raise InvalidRequest(f"{PARAM}: this model's vocabulary has no token for {what}", param=PARAM)
            rows[key] = len(masks)
            masks.append(mask)
        return rows[key]

    template: list[int | None] = []
    position_rows: list[int] = []
    holes: list[tuple[int, int]] = []
    for piece in _joined(pieces):
        if isinstance(piece, str):
            ids = _encode(tokenizer, piece)
            template += ids
            position_rows += [-1] * len(ids)
            continue
        if isinstance(piece, ClassHole):
            hole = _class_rows(piece, classes, row)
        else:
            hole = _choice_rows(tokenizer, piece, classes, row)
        holes.append((len(template), len(template) + len(hole)))
        template += [None] * len(hole)
        position_rows += hole
    if not holes:
        raise ValueError("a structured canvas needs at least one hole")
    return StructuredCanvas(template=template, masks=torch.stack(masks), classes=torch.tensor(position_rows),
                            holes=tuple(holes), pad_ids=frozenset({classes.pad_id}))


def _class_rows(piece: ClassHole, classes: TokenClasses,
                row: Callable[[tuple, Callable[[], torch.Tensor], str], int]) -> list[int]:
    if piece.token_class not in TOKEN_CLASSES or not 1 <= piece.size <= MAX_HOLE \
            or not 0 <= piece.required <= piece.size:
        raise ValueError(f"a hole of {piece.size} {piece.token_class!r} positions, {piece.required} required: "
                         "not one this engine lays out")
    what = f"a {piece.token_class} position"
    return [row((piece.token_class, i < piece.required), partial(classes.mask, piece.token_class, i < piece.required),
                what) for i in range(piece.size)]


def _choice_rows(tokenizer, piece: ChoiceHole, classes: TokenClasses,
                 row: Callable[[tuple, Callable[[], torch.Tensor], str], int]) -> list[int]:
    if not piece.choices or not all(isinstance(choice, str) for choice in piece.choices):
        raise ValueError("a choice hole needs one choice at least, as text")
    spelled = [_encode(tokenizer, choice) for choice in piece.choices]
    size = max(1, *(len(ids) for ids in spelled))
    if size > MAX_HOLE:
        raise InvalidRequest(f"{PARAM}: an enum value takes more than {MAX_HOLE} tokens", param=PARAM)
    positions = []
    for i in range(size):
        ids = frozenset(ids[i] for ids in spelled if len(ids) > i)
        pad = any(len(ids) <= i for ids in spelled)

        def make(ids: frozenset[int] = ids, pad: bool = pad) -> torch.Tensor:
            mask = torch.zeros(classes.vocab_size, dtype=torch.bool)
            mask[[t for t in ids if t < classes.vocab_size]] = True  # a tokenizer may know more ids than the model
            if pad:
                mask[classes.pad_id] = True
            return mask

        positions.append(row(("choice", ids, pad), make, "an enum value"))
    return positions


def _joined(pieces: Sequence[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif not (isinstance(piece, str) and not piece):
            out.append(piece)
    return out
