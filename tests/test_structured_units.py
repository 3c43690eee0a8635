"""edgeagent.structured without a model: what a hostile schema is refused for, and answers
that parse but are no JSON value to hand on."""

from __future__ import annotations

import re
from typing import Any

import pytest

from edgeagent.structured import InvalidAnswer, constraint_of, parse_answer


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        # 70 bytes that became nested rules deep enough to overflow llama.cpp's parser.
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 20000}, "`maxItems` above"),
        ({"type": "string", "maxLength": 30_000_000}, "`maxLength` above"),
        # jsonschema would fetch it while checking the answer.
        ({"$defs": {"a": {"type": "object"}}, "$ref": "#/$defs/a",
          "properties": {"y": {"$ref": "http://127.0.0.1:9/x"}}}, "only references inside"),
        ({"$schema": 5}, "`$schema` must be a string"),
        ({"type": "object", "patternProperties": {"^(a+)+$": {}}}, "`patternProperties`"),
        ({"type": "object", "required": "alarm"}, "not a valid JSON Schema"),
    ],
)  # fmt: skip
def test_hostile_or_broken_schemas_are_refused_with_a_reason(schema: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        constraint_of(schema, None)


def test_a_schema_that_refers_to_itself_in_circles_gives_invalid_not_a_crash() -> None:
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"],
              "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}}  # fmt: skip
    constraint = constraint_of(schema, None)
    assert constraint is not None
    with pytest.raises(InvalidAnswer, match="could not be checked"):
        parse_answer(constraint, '{"x": {}}')


def test_numbers_json_cannot_carry_are_invalid() -> None:
    constraint = constraint_of("json", None)
    assert constraint is not None
    for text in ('{"a": 1e999}', '{"a": NaN}', '{"a": -Infinity}'):
        with pytest.raises(InvalidAnswer):
            parse_answer(constraint, text)
    assert parse_answer(constraint, '{"a": 1e10}') == {"a": 1e10}


def test_a_pattern_is_taken_only_where_the_grammar_holds_to_it() -> None:
    assert constraint_of({"type": "string", "pattern": "^F[0-9]{2}$"}, None) is not None
    with pytest.raises(ValueError, match="`pattern` is taken only"):
        constraint_of({"type": ["string", "null"], "pattern": "^(a+)+$"}, None)
