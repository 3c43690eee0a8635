"""Structured answers: a request's `format` (any JSON object, or a JSON Schema) or `grammar`
(GBNF) as the grammar its decoding is held to, and the answer checked against it.

Pure Python; llama-cpp-python's schema converter is imported only when a schema arrives.
Limits keep a hostile schema or grammar from costing more than a small one: its size in bytes,
its nesting depth. llama.cpp parses the grammar itself on the inference thread (decoder.py);
an unparsable one is refused there, before any token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

MAX_SCHEMA_BYTES = 16_384
MAX_SCHEMA_DEPTH = 16
MAX_GRAMMAR_BYTES = 16_384

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


class InvalidAnswer(ValueError):
    """A complete JSON value that its schema does not allow (a keyword the grammar could not
    hold the decoding to, such as `minimum`)."""


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


def constraint_of(fmt: Any, grammar: Any) -> Optional[Constraint]:
    """The constraint a request's `format` and `grammar` ask for (None for neither); raises
    ValueError naming the field and what is wrong with it."""
    if fmt is not None and grammar is not None:
        raise ValueError("give at most one of `format` or `grammar`")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("`grammar` must be a non-empty GBNF string")
        if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
            raise ValueError(f"`grammar` is longer than {MAX_GRAMMAR_BYTES} bytes")
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
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise ValueError(f"`format` is a schema of more than {MAX_SCHEMA_BYTES} bytes")
    if _depth(fmt, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"`format` is a schema nested more than {MAX_SCHEMA_DEPTH} deep")
    import jsonschema  # noqa: PLC0415
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: PLC0415

    try:
        jsonschema.validators.validator_for(fmt).check_schema(fmt)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top"
        raise ValueError(f"`format` is not a valid JSON Schema (at {where}): "
                         f"{exc.message[:200]}") from None  # fmt: skip
    try:
        gbnf = json_schema_to_gbnf(text)
    except RecursionError:
        raise ValueError("`format`: the schema refers to itself too deeply") from None
    except Exception as exc:  # the converter asserts as well as raising ValueError
        raise ValueError(f"`format`: this schema cannot be turned into a grammar: {exc}") from None
    return Constraint("schema", gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR), fmt)


def parse_answer(constraint: Constraint, text: str) -> Any:
    """The answer's JSON value (for "json" and "schema"), checked against the schema; raises
    ValueError if it is not one (cut short), InvalidAnswer if the schema does not allow it.
    A grammar's answer has no value: None."""
    if constraint.kind == "grammar":
        return None
    value = json.loads(text)
    if constraint.schema is not None:
        import jsonschema  # noqa: PLC0415

        validator = jsonschema.validators.validator_for(constraint.schema)(constraint.schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top"
            raise InvalidAnswer(f"at {where}: {error.message[:200]}")
    return value
