"""JSON schema -> skeleton (common/json_schema.py): what is outside the subset is named by its path, and
whatever a hole holds that its token masks allow, the rendered document parses and fits its schema."""

from __future__ import annotations

import json
import random
import string

import jsonschema
import pytest

from common.json_schema import (
    MAX_CANVAS_TOKENS,
    ChoiceHole,
    DigitsHole,
    SignHole,
    Skeleton,
    StringHole,
    Text,
    UnsupportedSchema,
    compile_schema,
)


def obj(**properties) -> dict:
    return {"type": "object", "properties": properties}


UNSUPPORTED = [
    (obj(tags={"type": "array", "maxItems": 3, "items": {"oneOf": [{"type": "string"}]}}),
     "properties.tags.items.oneOf"),
    (obj(x={"anyOf": [{"type": "string"}, {"type": "integer"}]}), "properties.x.anyOf"),
    (obj(x={"$ref": "#/$defs/X"}), "properties.x.$ref"),
    ({**obj(x={"type": "string"}), "$defs": {}}, "$defs"),
    (obj(x={"type": "string", "pattern": "^a"}), "properties.x.pattern"),
    (obj(x={"type": "string", "format": "date"}), "properties.x.format"),
    (obj(n={"type": "integer", "minimum": 0}), "properties.n.minimum"),
    (obj(n={"type": "number", "multipleOf": 2}), "properties.n.multipleOf"),
    (obj(a={"type": "array", "items": {"type": "string"}}), "properties.a.maxItems"),
    (obj(a={"type": "array", "items": {"type": "string"}, "maxItems": 33}), "properties.a.maxItems"),
    (obj(a={"type": "array", "items": {"type": "string"}, "maxItems": 2, "minItems": 3}), "properties.a.minItems"),
    (obj(a={"type": "array", "maxItems": 2}), "properties.a.items"),
    (obj(a={"type": "array", "items": {"type": "string"}, "maxItems": 2, "uniqueItems": True}),
     "properties.a.uniqueItems"),
    (obj(x={"type": ["string", "null"]}), "properties.x.type"),
    (obj(x={"type": "null"}), "properties.x.type"),
    (obj(x={"description": "no type"}), "properties.x.type"),
    (obj(x={"enum": [{"a": 1}]}), "properties.x.enum"),
    (obj(x={"enum": []}), "properties.x.enum"),
    (obj(x={"type": "integer", "enum": ["a"]}), "properties.x.enum"),
    (obj(x={"type": "string", "minLength": 300}), "properties.x.minLength"),
    (obj(x={"type": "string", "minLength": 5, "maxLength": 2}), "properties.x.minLength"),
    (obj(x={"type": "string", "maxLength": -1}), "properties.x.maxLength"),
    ({**obj(x={"type": "string"}), "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({**obj(x={"type": "string"}), "required": ["y"]}, "required"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 2}, "type"),
    ({"enum": ["a"]}, "type"),
    ([1], ""),
    (obj(), "properties"),
    (obj(a=obj(b={"type": "object"})), "properties"),
]


@pytest.mark.parametrize("schema, path", UNSUPPORTED)
def test_what_is_unsupported_is_named_by_its_path(schema, path):
    with pytest.raises(UnsupportedSchema) as error:
        compile_schema(schema)
    assert error.value.path == path
    assert str(error.value).startswith(path or "the schema")


def test_a_schema_asking_for_too_large_a_canvas_is_refused_naming_the_limit():
    row = obj(**{f"f{i}": {"type": "string", "maxLength": 100} for i in range(20)})
    schema = obj(rows={"type": "array", "minItems": 32, "maxItems": 32, "items": row})
    with pytest.raises(UnsupportedSchema, match=str(MAX_CANVAS_TOKENS)) as error:
        compile_schema(schema)
    assert error.value.path == "properties.rows"
    def array(items: dict) -> dict:
        return {"type": "array", "minItems": 9, "maxItems": 9, "items": items}

    nested = obj(a=array(array(array({"type": "integer"}))))  # 729 integers
    with pytest.raises(UnsupportedSchema, match=str(MAX_CANVAS_TOKENS)):
        compile_schema(nested)


def test_deep_nesting_is_refused_not_a_recursion_error():
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = obj(x=schema)
    with pytest.raises(UnsupportedSchema, match="nested deeper"):
        compile_schema(schema)


def test_the_skeleton_is_the_documents_text_with_typed_holes():
    schema = {"type": "object", "title": "ignored", "properties": {
        "name": {"type": "string", "maxLength": 8, "description": "ignored"},
        "age": {"type": "integer"}, "score": {"type": "number"}, "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "blue"]}, "v": {"enum": [1, None]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5, "minItems": 1}},
        "required": ["name"], "additionalProperties": False}
    skeleton = compile_schema(schema)
    s, sign = StringHole(8, 0, 8), SignHole()
    assert skeleton.pieces == (
        Text('{"name": "'), s, Text('", "age": '), sign, DigitsHole(6, True), Text(', "score": '), sign,
        DigitsHole(6, True), Text("."), DigitsHole(4, False), Text(', "ok": '), ChoiceHole(("true", "false")),
        Text(', "colour": "'), ChoiceHole(("red", "blue")), Text('", "v": '), ChoiceHole(("1", "null")),
        Text(', "tags": ["'), StringHole(24), Text('", "'), StringHole(24), Text('", "'), StringHole(24),
        Text('"]}'))
    text = skeleton.render(["Ada Lovelace", "", "0036", "-", "003", "250", "true", "blu", "nul",
                            "a", "b", "c"])
    assert text == ('{"name": "Ada Love", "age": 36, "score": -3.250, "ok": true, "colour": "blue", "v": null, '
                    '"tags": ["a", "b", "c"]}')
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("least, most, count", [(0, 5, 3), (0, 2, 2), (4, 5, 4), (0, 0, 0), (7, 9, 7)])
def test_an_array_holds_a_fixed_count_of_items(least, most, count):
    schema = obj(a={"type": "array", "items": {"type": "integer"}, "minItems": least, "maxItems": most},
                 b={"type": "boolean"})
    skeleton = compile_schema(schema)
    items = sum(isinstance(piece, DigitsHole) for piece in skeleton.pieces)
    assert items == count
    values = ["", "7"] * count + ["false"]
    assert json.loads(skeleton.render(values))["a"] == [7] * count


def test_render_refuses_what_the_masks_would_not_have_allowed():
    skeleton = compile_schema(obj(s={"type": "string", "minLength": 2}, n={"type": "integer"}))
    for values in (['a"b', "", "1"], ["a\\b", "", "1"], ["a\nb", "", "1"], ["a", "", "1"], ["ab", "+", "1"],
                   ["ab", "", "1a"], ["ab", "", ""], ["ab", "", "١"]):
        with pytest.raises(ValueError, match="masks"):
            skeleton.render(values)
    with pytest.raises(ValueError):
        skeleton.render(["ab", ""])


def test_keys_and_enum_strings_are_escaped():
    schema = obj(**{'q"\\\n': {"enum": ['a"b', "c\\d", "é"]}})
    skeleton = compile_schema(schema)
    for choice in ('a\\"b', "c\\\\d", "é"):
        document = json.loads(skeleton.render([choice]))
        jsonschema.validate(document, schema)
        assert list(document) == ['q"\\\n']


# ---- the property: any hole content the masks allow renders to a valid document ------------------

PRINTABLE = [c for c in string.printable if c not in '"\\' and c >= " "] + list("éß名🙂\u2028")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "const"] + (["object", "array"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        properties = {rng.choice(["a", "b c", 'q"', "ключ", "x\\y"]) + str(i): random_schema(rng, depth + 1)
                      for i in range(rng.randint(1, 4))}
        return {"type": "object", "properties": properties, "required": rng.sample(list(properties), 1),
                "additionalProperties": rng.random() < 0.5}
    if kind == "array":
        most = rng.randint(0, 4)
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": most,
                "minItems": rng.randint(0, most)}
    if kind == "string":
        schema: dict = {"type": "string"}
        least = rng.choice([0, 0, 1, 3])
        if rng.random() < 0.5:
            schema["minLength"] = least
        if rng.random() < 0.5:
            schema["maxLength"] = least + rng.choice([0, 1, 5])
        return schema
    if kind in ("enum", "const"):
        pool = ["red", "", 'say "x"', "é", 0, -1, 2.5, 1e20, True, False, None, "null", "1"]
        values = rng.sample(pool, rng.randint(1, 4))
        return {"enum": values} if kind == "enum" else {"const": values[0]}
    return {"type": kind}


def allowed_text(hole, rng: random.Random) -> str:
    """What a hole's tokens could spell: the masks' classes, several characters a token, pads anywhere."""
    if isinstance(hole, StringHole):
        length = rng.randint(hole.min_chars, hole.size * 3)
        return "".join(rng.choice(PRINTABLE) for _ in range(length))
    if isinstance(hole, SignHole):
        return rng.choice(["", "-"])
    if isinstance(hole, DigitsHole):
        return "".join(rng.choice("0000123456789") for _ in range(rng.randint(1, hole.size * 3)))
    choice = rng.choice(hole.choices)
    return rng.choice([choice, choice[: rng.randint(0, len(choice))], choice + "zz", rng.choice(hole.choices)[:1]])


@pytest.mark.parametrize("seed", range(300))
def test_any_hole_content_the_masks_allow_renders_a_document_that_fits(seed):
    rng = random.Random(seed)
    properties = {f"p{i}": random_schema(rng) for i in range(rng.randint(1, 4))}
    schema = {"type": "object", "properties": {**properties, "n": {"type": "integer"}}}  # one hole at least
    skeleton = compile_schema(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for _ in range(5):
        validator.validate(json.loads(skeleton.render([allowed_text(hole, rng) for hole in skeleton.holes])))
    assert skeleton.size <= MAX_CANVAS_TOKENS


def test_a_skeleton_is_plain_data():
    skeleton = compile_schema(obj(x={"type": "integer"}))
    assert skeleton == Skeleton((Text('{"x": '), SignHole(), DigitsHole(6, True), Text("}")))
    assert hash(skeleton) == hash(compile_schema(obj(x={"type": "integer"})))
