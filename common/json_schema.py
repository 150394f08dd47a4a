"""JSON schema -> skeleton: the fixed text of a JSON document and typed holes for its values.

A structured-output request (``response_format: {"type": "json_schema", ...}``) is answered by
infilling: the schema compiles to a ``Skeleton`` whose text (braces, keys, quotes, colons, commas) is
fixed and whose holes the engine fills in one canvas, each hole position restricted to the tokens of
its kind (worker/engine/structured.py). The output is valid by construction, not by retrying.

Supported subset (anything else raises ``UnsupportedSchema`` naming its JSON path):

- ``type: "object"`` at the top level and nested, with ``properties``, ``required`` (names of its
  properties) and ``additionalProperties`` (a boolean). Every property is written, in the order of
  ``properties``, required or not (an optional property that is present is valid); nothing else is.
- ``type: "string"`` with ``minLength`` (at most ``MAX_STRING_TOKENS``) and ``maxLength``;
  ``"integer"``; ``"number"``; ``"boolean"``; ``enum`` / ``const`` of strings, numbers, booleans and
  null (null only this way).
- ``type: "array"`` with ``items`` and ``maxItems`` (at most ``MAX_ITEMS``; ``minItems`` <= it).
  Count policy: a canvas has a fixed length, so an array holds exactly
  ``min(max(DEFAULT_ITEMS, minItems), maxItems)`` items.
- Annotations (``title``, ``description``, ``default``, ``examples``, ``$schema``...) are ignored.

Holes, and what each position of one may hold (the engine's masks enforce this; "pad" is the
model's EOS, dropped before rendering):

- ``StringHole``: tokens without ``"``, ``\\``, control characters or partial UTF-8; its first
  ``min_chars`` positions are not pad and hold a non-space character each, the rest may be pad.
- ``SignHole``: ``-`` or pad. ``DigitsHole``: ASCII digit tokens, the first position not pad.
  An integer is a sign hole and a digits hole; a number adds a fixed ``.`` and a fraction's digits.
- ``ChoiceHole``: the tokens of the choices' texts, position by position (pad where a choice has
  ended). A string enum keeps its quotes as fixed text and its choices are the escaped bodies.

What ``Skeleton.render`` does with each hole's text (and nothing more): a string is cut to
``maxLength`` characters (a token may hold several) and JSON-escaped (a no-op for text the masks
allow, kept so a broken mask cannot break the document); an integer part loses its leading zeros
(``007`` -> ``7``, ``000`` -> ``0``); a choice hole's text selects the choice it equals, else the
one sharing its longest prefix, else the first. It raises ValueError when a hole's text is not
what its masks allow (a string with a quote, a digits hole with a letter, one too short): that is
a bug to report, not output to repair. Objects and arrays are text and are written as compiled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

MAX_CANVAS_TOKENS = 4096  # the most a skeleton may take (its text counted as UTF-8 bytes, a bound on tokens)
MAX_ITEMS = 32
DEFAULT_ITEMS = 3
MAX_DEPTH = 16  # nested objects and arrays
STRING_TOKENS = 24  # a string hole's positions unless maxLength is less or minLength more
MAX_STRING_TOKENS = 256  # minLength above this is refused
INTEGER_DIGITS = 6  # digit positions (tokens, of one digit or more) of an integer or a number's integer part
FRACTION_DIGITS = 4  # digit positions of a number's fraction

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"})
KEYWORDS = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "array": frozenset({"type", "items", "maxItems", "minItems"}),
    "string": frozenset({"type", "minLength", "maxLength"}),
    "integer": frozenset({"type"}),
    "number": frozenset({"type"}),
    "boolean": frozenset({"type"}),
}
KNOWN = ANNOTATIONS.union({"enum", "const"}, *KEYWORDS.values())
SUPPORTED = ("type object (properties, required, additionalProperties), string (minLength, maxLength), integer, "
             "number, boolean, array (items, maxItems, minItems), enum and const")
CONTROL = frozenset(chr(c) for c in range(0x20))


class UnsupportedSchema(ValueError):
    """A schema outside the supported subset, or malformed; ``path`` is the JSON path of what is at fault,
    dotted (``properties.tags.items.oneOf``; ``""`` for the whole schema)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or 'the schema'}: {reason}")
        self.path = path


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class StringHole:
    size: int  # positions (tokens)
    min_chars: int = 0
    max_chars: int | None = None


@dataclass(frozen=True)
class SignHole:
    size: int = 1


@dataclass(frozen=True)
class DigitsHole:
    size: int
    integer_part: bool  # leading zeros dropped (an integer, a number's integer part); a fraction keeps them


@dataclass(frozen=True)
class ChoiceHole:
    choices: tuple[str, ...]  # texts the hole may spell, one of which render writes


Hole = StringHole | SignHole | DigitsHole | ChoiceHole
Piece = Text | Hole


@dataclass(frozen=True)
class Skeleton:
    pieces: tuple[Piece, ...]  # adjacent texts merged

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(piece for piece in self.pieces if not isinstance(piece, Text))

    @property
    def size(self) -> int:
        return _size(self.pieces)

    def render(self, values: Sequence[str]) -> str:
        """The JSON document from each hole's text (pad dropped), in the holes' order (module docstring)."""
        holes = self.holes
        if len(values) != len(holes):
            raise ValueError(f"{len(holes)} holes, {len(values)} values")
        out: list[str] = []
        given = iter(values)
        for piece in self.pieces:
            out.append(piece.text if isinstance(piece, Text) else _render_hole(piece, next(given), len(out)))
        return "".join(out)


def compile_schema(schema: Any) -> Skeleton:
    """The skeleton of ``schema``; UnsupportedSchema naming the path of the first construct outside the subset."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema("", "a JSON schema is an object")
    if schema.get("type") != "object" or "enum" in schema or "const" in schema:
        raise UnsupportedSchema("type", 'the top level must be {"type": "object", ...}')
    pieces = _merge(_compile(schema, "", 0))
    if not any(not isinstance(piece, Text) for piece in pieces):
        raise UnsupportedSchema("properties", "the schema leaves no value to generate")
    return Skeleton(pieces)


# ---- compiling ----------------------------------------------------------------------------------

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _compile(node: Any, path: str, depth: int) -> list[Piece]:
    if not isinstance(node, dict):
        raise UnsupportedSchema(path, "a schema must be an object")
    if depth > MAX_DEPTH:
        raise UnsupportedSchema(path, f"nested deeper than {MAX_DEPTH} levels")
    for key in node:  # a construct outside the subset is named before anything else is judged
        if key not in KNOWN:
            raise UnsupportedSchema(_join(path, key), f"{key!r} is not supported; supported: {SUPPORTED}")
    if "enum" in node or "const" in node:
        return _compile_enum(node, path)
    kind = node.get("type")
    if kind is None:
        raise UnsupportedSchema(_join(path, "type"), f"a schema needs a type or an enum; supported: {SUPPORTED}")
    if not isinstance(kind, str) or kind not in KEYWORDS:
        raise UnsupportedSchema(_join(path, "type"),
                                f"type {json.dumps(kind)} is not supported; supported: {SUPPORTED}")
    _only(node, KEYWORDS[kind], path)
    if kind == "object":
        pieces = _compile_object(node, path, depth)
    elif kind == "array":
        pieces = _compile_array(node, path, depth)
    elif kind == "string":
        pieces = _compile_string(node, path)
    elif kind == "integer":
        pieces = [SignHole(), DigitsHole(INTEGER_DIGITS, integer_part=True)]
    elif kind == "number":
        pieces = [SignHole(), DigitsHole(INTEGER_DIGITS, integer_part=True), Text("."),
                  DigitsHole(FRACTION_DIGITS, integer_part=False)]
    else:
        pieces = [ChoiceHole(("true", "false"))]
    _bound(pieces, path)
    return pieces


def _only(node: dict[str, Any], allowed: frozenset[str], path: str) -> None:
    for key in node:
        if key not in allowed and key not in ANNOTATIONS:
            raise UnsupportedSchema(_join(path, key), f"{key!r} is not supported here; supported: {SUPPORTED}")


def _compile_object(node: dict[str, Any], path: str, depth: int) -> list[Piece]:
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        raise UnsupportedSchema(_join(path, "properties"), "properties must be an object")
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise UnsupportedSchema(_join(path, "required"), "required must be a list of property names")
    missing = [name for name in required if name not in properties]
    if missing:
        raise UnsupportedSchema(_join(path, "required"), f"names {missing[0]!r}, which is not in properties")
    extra = node.get("additionalProperties", False)
    if not isinstance(extra, bool):
        raise UnsupportedSchema(_join(path, "additionalProperties"), "only true or false is supported")
    pieces: list[Piece] = [Text("{")]
    size = 2
    for i, (name, child) in enumerate(properties.items()):
        key = Text(("" if i == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": ")
        value = _compile(child, _join(_join(path, "properties"), name), depth + 1)
        size += _size([key, *value])
        if size > MAX_CANVAS_TOKENS:
            _too_big(path, size)
        pieces += [key, *value]
    return [*pieces, Text("}")]


def _count(node: dict[str, Any], key: str, path: str, default: int | None) -> int:
    value = node.get(key, default)
    if value is None:
        raise UnsupportedSchema(_join(path, key), f"an array needs {key} (at most {MAX_ITEMS}): a canvas has "
                                                  "a fixed length")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsupportedSchema(_join(path, key), f"{key} must be a non-negative integer")
    return value


def _compile_array(node: dict[str, Any], path: str, depth: int) -> list[Piece]:
    most, least = _count(node, "maxItems", path, None), _count(node, "minItems", path, 0)
    if most > MAX_ITEMS:
        raise UnsupportedSchema(_join(path, "maxItems"), f"maxItems {most} is more than the {MAX_ITEMS} supported")
    if least > most:
        raise UnsupportedSchema(_join(path, "minItems"), f"minItems {least} is more than maxItems {most}")
    if "items" not in node:
        raise UnsupportedSchema(_join(path, "items"), "an array needs items (one schema for every item)")
    item = _compile(node["items"], _join(path, "items"), depth + 1)
    count = min(max(DEFAULT_ITEMS, least), most)
    if count * _size(item) > MAX_CANVAS_TOKENS:
        _too_big(path, count * _size(item))
    pieces: list[Piece] = [Text("[")]
    for i in range(count):
        pieces += ([] if i == 0 else [Text(", ")]) + item
    return [*pieces, Text("]")]


def _compile_string(node: dict[str, Any], path: str) -> list[Piece]:
    least = _count(node, "minLength", path, 0)
    most = node.get("maxLength")
    if most is not None:
        most = _count(node, "maxLength", path, None)
        if least > most:
            raise UnsupportedSchema(_join(path, "minLength"), f"minLength {least} is more than maxLength {most}")
    if least > MAX_STRING_TOKENS:
        raise UnsupportedSchema(_join(path, "minLength"), f"minLength above {MAX_STRING_TOKENS} is not supported")
    if most == 0:
        return [Text('""')]
    # A position holds at least one character, so maxLength positions may spell more, never fewer.
    size = max(STRING_TOKENS, least) if most is None else min(max(STRING_TOKENS, least), most)
    return [Text('"'), StringHole(size, least, most), Text('"')]


def _compile_enum(node: dict[str, Any], path: str) -> list[Piece]:
    _only(node, frozenset({"type", "enum", "const"}), path)
    if "enum" in node and "const" in node:
        raise UnsupportedSchema(_join(path, "const"), "give enum or const, not both")
    key = "enum" if "enum" in node else "const"
    values = node["enum"] if key == "enum" else [node["const"]]
    if not isinstance(values, list) or not values:
        raise UnsupportedSchema(_join(path, key), "enum must be a non-empty list")
    kind = node.get("type")
    for value in values:
        if isinstance(value, (dict, list)):
            raise UnsupportedSchema(_join(path, key), "only strings, numbers, booleans and null are supported "
                                                      "as enum values")
        if isinstance(value, float) and not math.isfinite(value):
            raise UnsupportedSchema(_join(path, key), f"{value} is not a JSON number")
        if kind is not None and not _is_of_type(value, kind):
            raise UnsupportedSchema(_join(path, key), f"{json.dumps(value)} is not of type {json.dumps(kind)}")
    if all(isinstance(value, str) for value in values):  # the quotes are fixed text around the choice
        bodies = _unique(json.dumps(value, ensure_ascii=False)[1:-1] for value in values)
        return [Text('"'), ChoiceHole(bodies), Text('"')]
    return [ChoiceHole(_unique(json.dumps(value, ensure_ascii=False) for value in values))]


def _is_of_type(value: Any, kind: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    return False  # an object or array type with an enum, or no such type


def _unique(texts: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


def _size(pieces: Sequence[Piece]) -> int:
    total = 0
    for piece in pieces:
        if isinstance(piece, Text):
            total += len(piece.text.encode())
        elif isinstance(piece, ChoiceHole):
            total += max(1, *(len(choice.encode()) for choice in piece.choices))
        else:
            total += piece.size
    return total


def _bound(pieces: Sequence[Piece], path: str) -> None:
    size = _size(pieces)
    if size > MAX_CANVAS_TOKENS:
        _too_big(path, size)


def _too_big(path: str, size: int) -> NoReturn:
    raise UnsupportedSchema(path, f"the output it describes would take about {size} tokens, more than the "
                                  f"{MAX_CANVAS_TOKENS} a structured output may take (lower maxItems or maxLength)")


def _merge(pieces: list[Piece]) -> tuple[Piece, ...]:
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if isinstance(piece, Text) and isinstance(last, Text):
            merged[-1] = Text(last.text + piece.text)
        else:
            merged.append(piece)
    return tuple(merged)


# ---- rendering ----------------------------------------------------------------------------------

def _render_hole(hole: Hole, value: str, at: int) -> str:
    def broken(what: str) -> ValueError:
        return ValueError(f"piece {at} ({type(hole).__name__}) holds {value!r}: {what}; its token masks were not "
                          "applied")

    if isinstance(hole, StringHole):
        if '"' in value or "\\" in value or CONTROL.intersection(value):
            raise broken("a quote, backslash or control character")
        if len(value) < hole.min_chars:
            raise broken(f"fewer than {hole.min_chars} characters")
        cut = value if hole.max_chars is None else value[: hole.max_chars]
        return json.dumps(cut, ensure_ascii=False)[1:-1]
    if isinstance(hole, SignHole):
        if value not in ("", "-"):
            raise broken("not a minus sign")
        return value
    if isinstance(hole, DigitsHole):
        if not value or not all("0" <= c <= "9" for c in value):
            raise broken("not ASCII digits")
        return (value.lstrip("0") or "0") if hole.integer_part else value
    return _choose(hole.choices, value)


def _choose(choices: tuple[str, ...], value: str) -> str:
    if value in choices:
        return value

    def shared(choice: str) -> int:
        n = 0
        for a, b in zip(choice, value, strict=False):
            if a != b:
                break
            n += 1
        return n

    return max(choices, key=shared)  # max keeps the first of equals
