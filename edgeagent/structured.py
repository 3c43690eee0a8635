"""Structured answers: a request's `format` (any JSON object, or a JSON Schema) or `grammar`
(GBNF) as the grammar its decoding is held to, and the answer checked against it.

Pure Python; llama-cpp-python's schema converter is imported only when a schema arrives.
Limits keep a hostile schema or grammar from costing more than a small one: its size in bytes,
its nesting depth. llama.cpp parses the grammar itself on the inference thread (decoder.py);
an unparsable one is refused there, before any token.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

from edgeagent import checker

# The grammar made from a schema is bounded too: this many times the schema's own limit.
SCHEMA_GRAMMAR_FACTOR = 4
SCHEMA_CACHE = 32  # schemas kept with their grammar (_SCHEMAS)
MAX_ANSWER_DEPTH = 64
REPEAT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength")
# Regular expressions on property names are Python `re` at validation time, with no bound on
# backtracking, and the grammar does not hold decoding to them: refused.
REFUSED_KEYWORDS = ("patternProperties", "propertyNames")
NAME_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")

# Any JSON object (llama.cpp's json.gbnf, as llama-cpp-python ships it), with an exponent
# rule that also takes e10.
ANY_OBJECT = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,3})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
# The converter's string characters take raw control characters, which JSON does not.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
# ... and a pattern's `.` takes a raw `"` or backslash, which ends or breaks the JSON string.
_LOOSE_DOT = "dot ::= [^\\x0A\\x0D]"
_STRICT_DOT = 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]'


class InvalidAnswer(ValueError):
    """A complete JSON value that its schema does not allow (a keyword the grammar could not
    hold the decoding to, such as `minimum`)."""


@dataclass(frozen=True)
class Limits:
    """What a request's `format` and `grammar` may cost ([engine] format_max_bytes, ...).
    A schema's repetition bounds become nested grammar rules, which llama.cpp's parser
    recurses on (20,000 overflows its stack): config caps `repeat` at 1,024."""

    schema_bytes: int = 16_384
    schema_depth: int = 16
    grammar_bytes: int = 16_384
    repeat: int = 256


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must be: `kind` "json" (any object), "schema" or "grammar";
    the GBNF its decoding follows; the schema its answer is checked against."""

    kind: str
    gbnf: str
    schema: Optional[dict[str, Any]] = None


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping once past `limit`."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_schema_shape(schema: Any, max_repeat: int) -> None:
    """Refuse what costs more than its size says: remote references (jsonschema would fetch
    them, the converter cannot use them), large repetition bounds, keywords of `re` on names."""
    stack: list[tuple[Any, bool]] = [(schema, False)]  # (value, a map of names to schemas)
    while stack:
        item, names = stack.pop()
        if isinstance(item, list):
            stack.extend((v, False) for v in item)
            continue
        if not isinstance(item, dict):
            continue
        if names:  # `properties`, `$defs`: its keys are names (a property may be `pattern`)
            stack.extend((v, False) for v in item.values())
            continue
        ref = item.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise ValueError("`format`: only references inside the schema (`#/...`) are taken")
        if "$schema" in item and not isinstance(item["$schema"], str):
            raise ValueError("`format`: `$schema` must be a string")
        for key in REPEAT_KEYWORDS:
            bound = item.get(key)
            if (
                isinstance(bound, (int, float))
                and not isinstance(bound, bool)
                and bound > max_repeat
            ):
                raise ValueError(f"`format`: `{key}` above {max_repeat} is not taken")
        for key in REFUSED_KEYWORDS:
            if key in item:
                raise ValueError(f"`format`: `{key}` is not taken")
        if "pattern" in item and item.get("type") != "string":
            # Only there does the grammar hold the string to it; elsewhere Python's re would
            # judge whatever the model wrote, with no bound on backtracking.
            raise ValueError('`format`: `pattern` is taken only beside "type": "string"')
        stack.extend((v, k in NAME_MAPS) for k, v in item.items())


def constraint_of(fmt: Any, grammar: Any,
                  limits: Limits = DEFAULT_LIMITS) -> Optional[Constraint]:  # fmt: skip
    """The constraint a request's `format` and `grammar` ask for (None for neither); raises
    ValueError naming the field and what is wrong with it."""
    if fmt is not None and grammar is not None:
        raise ValueError("give at most one of `format` or `grammar`")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("`grammar` must be a non-empty GBNF string")
        if len(grammar.encode()) > limits.grammar_bytes:
            raise ValueError(f"`grammar` is longer than {limits.grammar_bytes} bytes")
        if not re.search(r"(?m)^\s*root\s*::=", grammar):
            raise ValueError("`grammar` must define the rule `root`")
        return Constraint("grammar", grammar)
    if fmt is None:
        return None
    if fmt == "json":
        return Constraint("json", ANY_OBJECT)
    if not isinstance(fmt, dict):
        raise ValueError('`format` must be "json" or a JSON Schema object')
    text = json.dumps(fmt, separators=(",", ":"))
    if len(text.encode()) > limits.schema_bytes:
        raise ValueError(f"`format` is a schema of more than {limits.schema_bytes} bytes")
    key = (hashlib.sha256(text.encode()).digest(), limits)
    with _SCHEMAS_LOCK:
        found = _SCHEMAS.get(key)
        if found is not None:
            _SCHEMAS.move_to_end(key)
            return found
    made = _schema_constraint(text, limits)
    with _SCHEMAS_LOCK:
        _SCHEMAS[key] = made
        while len(_SCHEMAS) > SCHEMA_CACHE:
            _SCHEMAS.popitem(last=False)
    return made


# Schemas with their grammar, by their JSON text's hash: checking a schema and turning it into
# GBNF takes 1-2 ms of the event loop, and a line sends the same schema every time.
_SCHEMAS: collections.OrderedDict[tuple[bytes, Limits], Constraint] = collections.OrderedDict()
_SCHEMAS_LOCK = threading.Lock()


def _schema_constraint(text: str, limits: Limits) -> Constraint:
    fmt = json.loads(text)
    _check_schema(fmt, limits)
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: PLC0415

    try:
        gbnf = json_schema_to_gbnf(text)
    except RecursionError:
        raise ValueError("`format`: the schema refers to itself too deeply") from None
    except Exception as exc:  # the converter asserts as well as raising ValueError
        raise ValueError(f"`format`: this schema cannot be turned into a grammar: {exc}") from None
    most = SCHEMA_GRAMMAR_FACTOR * limits.schema_bytes
    if len(gbnf.encode()) > most:
        raise ValueError(f"`format`: the schema's grammar is over {most} bytes")
    gbnf = gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR).replace(_LOOSE_DOT, _STRICT_DOT)
    return Constraint("schema", gbnf, fmt)


def _check_schema(fmt: dict[str, Any], limits: Limits) -> None:
    """Raises ValueError naming what is wrong unless `fmt` is a JSON Schema within `limits`."""
    if _depth(fmt, limits.schema_depth) > limits.schema_depth:
        raise ValueError(f"`format` is a schema nested more than {limits.schema_depth} deep")
    _check_schema_shape(fmt, limits.repeat)
    import jsonschema  # noqa: PLC0415

    try:
        jsonschema.validators.validator_for(fmt).check_schema(fmt)
    except RecursionError:
        raise ValueError("`format`: the schema is nested too deeply") from None
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top"
        raise ValueError(f"`format` is not a valid JSON Schema (at {where}): "
                         f"{exc.message[:200]}") from None  # fmt: skip


def answer_check(fmt: Any) -> Constraint:
    """What an answer to a request with this `format` is checked against, without its grammar
    (the cloud's answer: the edge checks it, the model server held decoding to it)."""
    if fmt == "json":
        return Constraint("json", "")
    if not isinstance(fmt, dict):
        raise ValueError('`format` must be "json" or a JSON Schema object')
    return Constraint("schema", "", fmt)


def parse_answer(constraint: Constraint, text: str) -> Any:
    """The answer's JSON value (for "json" and "schema"), checked against the schema; raises
    ValueError if it is not one (cut short), InvalidAnswer if the schema does not allow it.
    A grammar's answer has no value: None."""
    if constraint.kind == "grammar":
        return None
    value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    if _depth(value, MAX_ANSWER_DEPTH) > MAX_ANSWER_DEPTH:
        # A value nested about a thousand deep parses, and then cannot be sent on.
        raise InvalidAnswer(f"a value nested more than {MAX_ANSWER_DEPTH} deep")
    if constraint.kind == "json" and not isinstance(value, dict):
        raise InvalidAnswer(f"a JSON {type(value).__name__}, not an object")
    if constraint.schema is not None:
        try:
            error = checker.shared().errors(constraint.schema, value)
        except checker.CheckTimeout as exc:
            raise InvalidAnswer(f"the schema could not be checked: {exc}") from None
        if error is not None:
            raise InvalidAnswer(error)
    return value


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidAnswer(f"the number {text[:40]} is beyond what JSON answers carry")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidAnswer(f"{name} is not JSON")
