"""edgeagent.structured without a model: what a hostile schema is refused for, and answers
that parse but are no JSON value to hand on."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from edgeagent import checker, config
from edgeagent.cloud_worker import EscalationError, parse_escalation, response_format
from edgeagent.structured import (
    Constraint,
    InvalidAnswer,
    Limits,
    answer_check,
    constraint_of,
    parse_answer,
)


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


def test_the_limits_come_from_config() -> None:
    """[engine] format_max_bytes, format_max_depth, format_max_repeat, grammar_max_bytes."""
    small = Limits(schema_bytes=64, schema_depth=3, grammar_bytes=64, repeat=8)
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(4)}}
    deep = {"properties": {"a": {"properties": {}}}}  # 4 deep, 36 bytes
    long = {"type": "string", "maxLength": 9}
    cases = [(wide, "more than 64 bytes"), (deep, "nested more than 3 deep"),
             (long, "`maxLength` above 8")]  # fmt: skip
    for schema, reason in cases:
        assert constraint_of(schema, None) is not None
        with pytest.raises(ValueError, match=re.escape(reason)):
            constraint_of(schema, None, small)
    with pytest.raises(ValueError, match="longer than 64 bytes"):
        constraint_of(None, "root ::= " + '"a" ' * 20, small)
    cfg = config.parse("[engine]\nformat_max_bytes = 64\nformat_max_repeat = 8\n", "t.toml")
    assert config.format_limits(cfg.engine) == Limits(64, 16, 16_384, 8)
    with pytest.raises(config.ConfigError, match=r"engine\.format_max_repeat: 2000 is above"):
        config.parse("[engine]\nformat_max_repeat = 2000\n", "t.toml")


def test_a_cloud_answer_is_checked_without_a_grammar() -> None:
    assert answer_check("json") == Constraint("json", "")
    with pytest.raises(InvalidAnswer, match="not an object"):
        parse_answer(answer_check("json"), "[1, 2]")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert parse_answer(answer_check(schema), '{"ok": true}') == {"ok": True}
    with pytest.raises(InvalidAnswer, match="'ok' is a required property"):
        parse_answer(answer_check(schema), "{}")
    with pytest.raises(ValueError):
        parse_answer(answer_check(schema), "Sure! Here is the JSON: {")


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("openai", {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": {"type": "object"}, "strict": True}}),
        ("tgi", {"type": "json_object", "value": {"type": "object"}}),
        ("llama-cpp", {"type": "json_object", "schema": {"type": "object"}}),
        ("off", None),
    ],
)  # fmt: skip
def test_the_worker_passes_a_schema_as_each_model_server_takes_it(
    style: str, expected: Any
) -> None:
    assert response_format({"type": "object"}, style) == expected
    assert response_format(None, style) is None
    any_object = response_format("json", style)
    if style == "tgi":
        assert any_object == {"type": "json_object", "value": {"type": "object"}}
    elif style != "off":
        assert any_object == {"type": "json_object"}


def test_the_worker_refuses_a_format_that_is_no_schema() -> None:
    base = {"escalation_id": "e1", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_escalation(json.dumps({**base, "format": {"type": "object"}}).encode())
    for bad in ("yaml", 5, ["json"], {"x": "y" * (1 << 20)}):
        with pytest.raises(EscalationError, match="`format`"):
            parse_escalation(json.dumps({**base, "format": bad}).encode())


def test_a_patterns_dot_cannot_end_the_json_string() -> None:
    """The converter's `.` takes any character but a line break, a raw `"` too, which would
    end the string early; here it takes what a JSON string holds raw."""
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^F.[0-9]$"}}}
    constraint = constraint_of(schema, None)
    assert constraint is not None
    dot = [line for line in constraint.gbnf.splitlines() if line.startswith("dot ::=")]
    assert dot == ['dot ::= [^"\\\\\\x7F\\x00-\\x1F]'], dot


def test_a_check_that_backtracks_is_cut_at_its_time_and_the_next_one_works() -> None:
    """`^(a+)+$` against 40 a's and a "!" backtracks for hours in Python's re: the child
    checking it is killed after its time, the answer is invalid, and the next check works."""
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}}}
    constraint = answer_check(schema)
    shared = checker.shared()
    killed = shared.killed
    started = time.monotonic()
    with pytest.raises(InvalidAnswer, match="longer than"):
        parse_answer(constraint, json.dumps({"code": "a" * 40 + "!"}))
    assert time.monotonic() - started < shared.timeout_s + 5
    assert shared.killed == killed + 1
    assert parse_answer(constraint, '{"code": "aaa"}') == {"code": "aaa"}
    with pytest.raises(InvalidAnswer, match="does not match"):
        parse_answer(constraint, '{"code": "b"}')


def test_an_answer_nested_past_what_can_be_sent_on_is_invalid() -> None:
    deep = "[" * 200 + "]" * 200
    with pytest.raises(InvalidAnswer, match="nested more than 64"):
        parse_answer(answer_check("json"), '{"a": ' + deep + "}")


def test_a_property_may_be_named_like_a_keyword() -> None:
    schema = {"type": "object", "properties": {"pattern": {"type": "integer"},
                                               "maxItems": {"type": "integer"}}}  # fmt: skip
    constraint = constraint_of(schema, None, Limits(repeat=8))
    assert constraint is not None
    assert parse_answer(constraint, '{"pattern": 3, "maxItems": 9000}') == {
        "pattern": 3, "maxItems": 9000}  # fmt: skip
    with pytest.raises(ValueError, match="`pattern` is taken only"):
        constraint_of({"type": "integer", "pattern": "^1$"}, None)


def test_a_schema_file_must_hold_an_object(tmp_path: Any) -> None:
    for text in ("null", '"json"', "[]"):
        (tmp_path / "s.json").write_text(text)
        with pytest.raises(ValueError, match="not a JSON Schema object"):
            config.read_schema_file(tmp_path / "s.json", Limits())
