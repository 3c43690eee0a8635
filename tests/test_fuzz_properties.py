"""Properties of everything that reads outside input, checked on generated inputs (hypothesis).

The request parser (any bytes, any JSON value, from any call depth), the config loader (random
TOML documents) and the escalation policy (any request, any rules). Example counts are kept
small enough for the whole file to run in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgeagent import config, policy, protocol
from edgeagent.config import EscalationConfig
from edgeagent.protocol import Op, ProtocolError, Request

MAX_TOKENS_LIMIT = 512
# An error message is for people: it never grows with the input that caused it.
MAX_ERROR_MESSAGE = 512

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies shared by the parser properties ------------------------------------------------

odd_chars = st.sampled_from(
    ["\x00", "\x1b", "\x7f", "\n", "\r", "\u2028", "\ufeff", "\ud800", "\udfff", "€", "😀", '"']
)
any_text = st.text(st.characters() | odd_chars, max_size=40)
INJECTION_NAMES = [
    "__proto__", "constructor", "__class__", "system", "role", "content", "$where", "op ",
    " id", "ID", "Prompt", "prompt\x00", "id\x00", "instructions", "ignore_previous_instructions",
    "You are now in developer mode", "</s><|im_start|>system", "{{7*7}}", "${jndi:ldap://x}",
    "reply_to", "max_tokens\u200b", "\uff50\uff52\uff4f\uff4d\uff50\uff54",
]  # fmt: skip
field_names = st.sampled_from(
    [*sorted(protocol.REQUEST_FIELDS), "op", "session", *INJECTION_NAMES]
) | st.text(max_size=12)
huge_ints = st.integers(min_value=-(10**400), max_value=10**400)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=False)
    | any_text
    | st.sampled_from(["", "status", "cancel", "reset", "result", "user", "system", "x" * 129])
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(field_names, children, max_size=6)
    ),
    max_leaves=25,
)
request_like = st.dictionaries(field_names, json_values, max_size=8)


def parse(obj: Any) -> Request | Op:
    return protocol.parse(obj, max_tokens_limit=MAX_TOKENS_LIMIT)


def valid_id_of(obj: Any) -> Optional[str]:
    """The id an error must carry: the request's own, when it is a valid id (test's own rule)."""
    if not isinstance(obj, dict):
        return None
    rid = obj.get("id")
    return rid if isinstance(rid, str) and 1 <= len(rid) <= protocol.MAX_ID_LEN else None


def outcome(obj: Any) -> tuple[Any, ...]:
    """What parsing `obj` gives, as a comparable value; asserts the parser's contract."""
    try:
        result = parse(obj)
    except ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST
        assert exc.message and len(exc.message) <= MAX_ERROR_MESSAGE, exc.message[:200]
        assert exc.request_id == valid_id_of(obj)
        return ("error", exc.message, exc.request_id)
    assert isinstance(result, (Request, Op))
    return ("ok", result)


def at_depth(frames: int, fn: Callable[[], Any]) -> Any:
    """Run `fn` `frames` calls deeper: transports parse from deeper stacks than tests do."""
    return fn() if frames <= 0 else at_depth(frames - 1, fn)


# --- the request parser ----------------------------------------------------------------------

json_fragments = st.lists(
    st.sampled_from(
        [b"{", b"}", b"[", b"]", b'"', b":", b",", b"1", b"-", b"0.5", b"e9999", b"1" * 5000,
         b"NaN", b"Infinity", b"-Infinity", b"true", b"null", b"\\u", b"\\ud800", b"\\u0000",
         b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b" ", b"\n", b"\r", b"\t", b'"id"',
         b'"op"', b'"prompt"', b'"messages"', b'"x"', b"\xef\xbb\xbf"]
    ),
    max_size=60,
).map(b"".join)  # fmt: skip


@FAST
@given(data=st.binary(max_size=300) | json_fragments)
def test_decode_gives_a_value_or_a_bad_request(data: bytes) -> None:
    try:
        value = protocol.decode(data)
    except ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST
        assert exc.message and len(exc.message) <= MAX_ERROR_MESSAGE
        assert exc.request_id is None
        return
    # What decodes reads as the standard library reads it.
    assert json.dumps(value) == json.dumps(json.loads(data))


@FAST
@given(
    data=st.binary(max_size=300)
    | json_fragments
    | json_values.map(lambda v: json.dumps(v).encode())
)
def test_any_bytes_give_a_request_an_op_or_a_protocol_error(data: bytes) -> None:
    try:
        obj = protocol.decode(data)
    except ProtocolError:
        return
    outcome(obj)


@FAST
@given(obj=request_like | json_values)
@example(obj={"id": "t", "prompt": "x", "temperature": 10**400})
@example(obj={"op": "x" * 100_000})
def test_any_json_value_is_a_request_an_op_or_a_protocol_error_and_parsing_is_pure(
    obj: Any,
) -> None:
    before = copy.deepcopy(obj)
    first = outcome(obj)
    assert obj == before  # the parser does not touch its input
    assert outcome(obj) == first  # and gives the same answer every time


NESTING_PLACES = {
    "top": "%s",
    "op": '{"op":%s}',
    "op id": '{"op":"cancel","id":%s}',
    "id": '{"prompt":"x","id":%s}',
    "prompt": '{"id":"n","prompt":%s}',
    "messages": '{"id":"n","messages":%s}',
    "role": '{"id":"n","messages":[{"role":%s,"content":"x"}]}',
    "content": '{"id":"n","messages":[{"role":"user","content":%s}]}',
    "stop": '{"id":"n","prompt":"x","stop":%s}',
    "unknown field": '{"id":"n","prompt":"x","extra":%s}',
}


@SLOW
@given(
    depth=st.integers(1, 1200),
    frames=st.integers(0, 120),
    where=st.sampled_from(sorted(NESTING_PLACES)),
    kind=st.sampled_from(["[", '{"a":']),
)
@example(depth=975, frames=20, where="op", kind="[")
def test_deep_nesting_is_a_bad_request_from_any_call_depth(
    depth: int, frames: int, where: str, kind: str
) -> None:
    close = "]" if kind == "[" else "}"
    doc = NESTING_PLACES[where] % (kind * depth + "1" + close * depth)

    def run() -> Any:
        try:
            return outcome(protocol.decode(doc.encode()))
        except ProtocolError as exc:
            return ("undecodable", exc.message)

    assert at_depth(frames, run)[0] in ("error", "undecodable")


@FAST
@given(
    name=st.text(st.characters() | odd_chars, min_size=1, max_size=300),
    count=st.integers(1, 300),
    where=st.sampled_from(["field", "op", "op-field"]),
)
def test_error_messages_stay_short_whatever_they_quote(name: str, count: int, where: str) -> None:
    names = {f"{name}{i}" for i in range(count)}
    if where == "field":
        obj: dict[str, Any] = {"id": "q", "prompt": "x", **dict.fromkeys(names, 1)}
    elif where == "op":
        obj = {"op": name * count + "?"}
    else:
        obj = {"op": "status", **dict.fromkeys(names, 1)}
    kind, message, _rid = outcome(obj)
    assert kind == "error" and "unknown" in message
    assert len(protocol.encode(protocol.error_event(None, protocol.BAD_REQUEST, message))) < 4096


valid_ids = st.text(st.characters() | odd_chars, min_size=1, max_size=protocol.MAX_ID_LEN)
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(protocol.ROLES), "content": any_text}),
    max_size=5,
).flatmap(
    lambda head: st.fixed_dictionaries({"role": st.just("user"), "content": any_text}).map(
        lambda last: [*head, last]
    )
)
valid_options = st.fixed_dictionaries(
    {},
    optional={
        "session": valid_ids,
        "max_tokens": st.integers(1, MAX_TOKENS_LIMIT) | st.none(),
        "temperature": st.floats(0.0, 2.0) | st.integers(0, 2) | st.none(),
        "stream": st.booleans(),
        "deadline_ms": st.integers(1, 86_400_000) | st.none(),
        "stop": st.lists(st.text(min_size=1, max_size=64), max_size=8),
        "escalate": st.booleans() | st.none(),
        "private": st.booleans(),
    },
)
valid_requests = st.builds(
    lambda rid, body, opts: {"id": rid, **body, **opts},
    valid_ids,
    st.one_of(
        st.text(st.characters() | odd_chars, min_size=1, max_size=40).map(lambda p: {"prompt": p}),
        valid_messages.map(lambda m: {"messages": m}),
    ),
    valid_options,
)


@FAST
@given(obj=valid_requests)
def test_valid_requests_are_read_exactly(obj: dict[str, Any]) -> None:
    req = parse(obj)
    assert isinstance(req, Request)
    assert req.id == obj["id"]
    expected = obj.get("messages") or [{"role": "user", "content": obj.get("prompt")}]
    assert [dict(m) for m in req.messages] == expected
    assert req.session == obj.get("session")
    assert req.max_tokens == obj.get("max_tokens")
    t = obj.get("temperature")
    assert req.temperature == (None if t is None else float(t))
    assert req.stream == obj.get("stream", True)
    assert req.deadline_ms == obj.get("deadline_ms")
    assert req.stop == tuple(obj.get("stop", ()))
    assert req.escalate == obj.get("escalate")
    assert req.private == obj.get("private", False)


# For each field, values that must be refused, and a word the error message must contain.
not_a_string = st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.integers())
not_a_bool = st.none() | st.integers(0, 1) | st.sampled_from(["true", "yes", [], {}, 1.0])
not_an_int = st.booleans() | st.floats() | st.text(max_size=3) | st.lists(st.integers(), max_size=2)
INVALID: dict[str, tuple[st.SearchStrategy[Any], str]] = {
    "id": (not_a_string | st.just("") | st.text(min_size=129, max_size=140), "id"),
    "prompt": (not_a_string | st.just(""), "prompt"),
    "messages": (
        not_a_string
        | st.just([])
        | st.just([{"role": "user", "content": "x"}] * 257)
        | st.just([{"role": "user"}])
        | st.just([{"role": "user", "content": "x", "name": "n"}])
        | st.just([{"role": "assistant", "content": "x"}])
        | st.just([{"role": "robot", "content": "x"}])
        | st.just([{"role": ["user"], "content": "x"}])
        | st.just([{"role": "user", "content": 5}])
        | st.just(["user: x"]),
        "message",
    ),
    "session": (not_a_string | st.just("") | st.text(min_size=129, max_size=140), "session"),
    "max_tokens": (
        not_an_int
        | st.integers(max_value=0)
        | st.integers(min_value=MAX_TOKENS_LIMIT + 1)
        | huge_ints.filter(lambda v: not 1 <= v <= MAX_TOKENS_LIMIT),
        "max_tokens",
    ),
    "temperature": (
        st.booleans()
        | st.text(max_size=3)
        | st.lists(st.floats(), max_size=2)
        | st.floats(allow_nan=True).filter(lambda v: not 0.0 <= v <= 2.0)
        | huge_ints.filter(lambda v: not 0 <= v <= 2),
        "temperature",
    ),
    "stream": (not_a_bool, "stream"),
    "deadline_ms": (
        not_an_int
        | st.integers(max_value=0)
        | st.integers(min_value=86_400_001)
        | huge_ints.filter(lambda v: not 1 <= v <= 86_400_000),
        "deadline_ms",
    ),
    "stop": (
        st.none()
        | st.text(max_size=3)
        | st.just([""])
        | st.just(["x"] * 9)
        | st.just(["x" * 65])
        | st.just([1])
        | st.just([["x"]]),
        "stop",
    ),
    "escalate": (st.integers(0, 1) | st.sampled_from(["true", [], {}]), "escalate"),
    "private": (not_a_bool, "private"),
}


@FAST
@given(obj=valid_requests, data=st.data())
def test_one_wrong_field_is_refused_and_named(obj: dict[str, Any], data: st.DataObject) -> None:
    which = data.draw(st.sampled_from([*sorted(INVALID), "unknown"]))
    if which == "unknown":
        # ("op" is not unknown: it makes the object a control operation.)
        name = data.draw(field_names.filter(lambda n: n not in {*protocol.REQUEST_FIELDS, "op"}))
        obj[name], word = data.draw(json_values), "unknown field"
    else:
        strategy, word = INVALID[which]
        if which == "prompt" and "messages" in obj:
            obj["messages"], which = data.draw(INVALID["messages"][0]), "messages"
            word = INVALID["messages"][1]
        elif which == "messages" and "prompt" in obj:
            obj["prompt"], which = data.draw(INVALID["prompt"][0]), "prompt"
            word = INVALID["prompt"][1]
        else:
            obj[which] = data.draw(strategy)
    kind, message, rid = outcome(obj)
    assert kind == "error"
    assert word in message, (which, message)
    assert rid == (obj["id"] if which != "id" else None)


control_ops = st.one_of(
    st.fixed_dictionaries({"op": st.just("status")}),
    st.fixed_dictionaries({"op": st.sampled_from(["cancel", "result"]), "id": valid_ids}),
    st.fixed_dictionaries({"op": st.just("reset"), "session": valid_ids}),
)


@FAST
@given(op=control_ops, extra=st.dictionaries(field_names, json_values, min_size=1, max_size=3))
def test_ops_take_exactly_their_fields(op: dict[str, Any], extra: dict[str, Any]) -> None:
    assert parse(op) == Op(op["op"], id=op.get("id"), session=op.get("session"))
    unknown = {k: v for k, v in extra.items() if k not in op}
    assume(unknown)
    kind, message, _rid = outcome({**op, **unknown})
    assert kind == "error" and "unknown field" in message


@FAST
@given(rid=st.none() | valid_ids, text=st.text(st.characters() | odd_chars, max_size=200))
def test_every_event_is_one_ascii_line_that_reads_back(rid: Optional[str], text: str) -> None:
    for event in (protocol.token_event(rid or "x", text),
                  protocol.error_event(rid, protocol.BAD_REQUEST, text)):  # fmt: skip
        line = protocol.encode(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
        assert json.loads(line) == event


# --- the config loader -------------------------------------------------------------------------


def _known_keys() -> dict[str, Any]:
    """Every config key with its Python type, read from the config's own dataclasses."""
    out: dict[str, Any] = {}

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = (hints[f.name], f.metadata)

    walk(config.Config, "")
    return out


KNOWN = _known_keys()
assert set(KNOWN) == {key for key, _, _ in config.describe_keys()}
SECTIONS = {k.rsplit(".", 1)[0] for k in KNOWN if "." in k}
SECTIONS |= {s.rsplit(".", 1)[0] for s in SECTIONS if "." in s}


def toml_string(s: str) -> str:
    escaped = []
    for ch in s:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf, -inf and nan are TOML too
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    """Top-level keys first, then one [table] per dict-valued key (nested dicts inline)."""
    lines = [
        f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(name)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def paths(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out[prefix + k] = v
        if isinstance(v, dict):
            out.update(paths(v, f"{prefix}{k}."))
    return out


toml_text = st.text(
    st.characters(exclude_categories=("Cs",)) | st.sampled_from(["\x00", "\x7f", "\n", '"']),
    max_size=16,
)
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers(-5, 70000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | toml_text
    | st.sampled_from(["auto", "0660", "0o600", "5", "3.1.1", "info", "2-3", "", "local"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(toml_text, children, max_size=3)
    ),
    max_leaves=6,
)
key_names = st.sampled_from(sorted({k.rsplit(".", 1)[-1] for k in KNOWN})) | toml_text


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(KNOWN)), max_size=6)):
        head, _, last = key.rpartition(".")
        table = doc
        for part in head.split(".") if head else []:
            table = table.setdefault(part, {}) if isinstance(table.get(part, {}), dict) else {}
        table[last] = draw(toml_values)
    for _ in range(draw(st.integers(0, 3))):  # unknown keys, or wrong shapes for known ones
        where = draw(st.sampled_from(["", *sorted(SECTIONS)]))
        table = doc
        for part in where.split(".") if where else []:
            table = table.setdefault(part, {}) if isinstance(table.get(part, {}), dict) else {}
        table[draw(key_names)] = draw(toml_values)
    return doc


def load(doc: dict[str, Any]) -> config.Config | config.ConfigError:
    try:
        return config.parse(toml_document(doc), "f.toml")
    except config.ConfigError as exc:
        return exc


def wrong_type(key: str, value: Any) -> bool:
    tp, _meta = KNOWN[key]
    if tp is bool:
        return not isinstance(value, bool)
    if tp is int:
        octal_mode = key.endswith(".mode") and isinstance(value, str)  # mode = "0660"
        return not octal_mode and (isinstance(value, bool) or not isinstance(value, int))
    if tp is float:
        return isinstance(value, bool) or not isinstance(value, (int, float))
    if tp is str:
        return not isinstance(value, str)
    return False  # lists, core sets: checked by their own rules


@SLOW
@given(doc=config_documents())
def test_any_config_document_loads_or_names_every_bad_key(doc: dict[str, Any]) -> None:
    result = load(doc)
    again = load(doc)  # the same document gives the same outcome
    if isinstance(result, config.ConfigError):
        assert isinstance(again, config.ConfigError) and again.problems == result.problems
    else:
        assert again == result
    given_paths = paths(doc)
    if isinstance(result, config.Config):
        for key, value in given_paths.items():
            tp = KNOWN.get(key, (None, None))[0]
            if key == "node_id" and value == "":
                assert result.node_id  # empty means the host name
            elif tp in (bool, int, str) and not key.endswith(".mode"):
                obj: Any = result
                for part in key.split("."):
                    obj = getattr(obj, part)
                assert obj == value, key
            elif tp is float:
                obj = result
                for part in key.split("."):
                    obj = getattr(obj, part)
                assert obj == float(value), key
        return
    problems = result.problems
    assert problems
    nameable = set(given_paths) | set(KNOWN) | SECTIONS
    named = set()
    for problem in problems:
        assert not problem.startswith("f.toml: invalid TOML"), problem  # our writer's fault
        keys = {k for k in nameable if problem.startswith(f"f.toml: {k}: ")}
        assert keys, problem  # every problem is `file: key: reason`
        named |= keys
    for key, value in given_paths.items():
        under_known = key.rsplit(".", 1)[0] in SECTIONS if "." in key else True
        if key not in KNOWN and key not in SECTIONS and under_known:
            assert key in named, (key, problems)  # an unknown key is always reported
        if key in KNOWN and wrong_type(key, value):
            assert key in named, (key, problems)
        if key in SECTIONS and not isinstance(value, dict):
            assert key in named, (key, problems)


def in_range_value(tp: Any, meta: Any) -> st.SearchStrategy[Any]:
    lo, hi = meta.get("lo"), meta.get("hi")
    if tp is int:
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi)


NUMERIC = sorted(
    k for k, (tp, meta) in KNOWN.items() if tp in (int, float) and meta.get("lo") is not None
)


@SLOW
@given(data=st.data(), keys=st.lists(st.sampled_from(NUMERIC), min_size=1, max_size=8, unique=True))
def test_values_inside_the_documented_bounds_are_accepted(
    data: st.DataObject, keys: list[str]
) -> None:
    doc: dict[str, Any] = {}
    for key in keys:
        tp, meta = KNOWN[key]
        *sections, last = key.split(".")
        table = doc
        for part in sections:
            table = table.setdefault(part, {})
        table[last] = data.draw(in_range_value(tp, meta), label=key)
    result = load(doc)
    if isinstance(result, config.ConfigError):
        # Only the cross-checks between keys (max_tokens < n_ctx...) may refuse such values.
        for problem in result.problems:
            assert "minimum" not in problem and "maximum" not in problem, problem
            assert "expected" not in problem, problem
        return
    for key in keys:
        obj: Any = result
        for part in key.split("."):
            obj = getattr(obj, part)
        value = paths(doc)[key]
        assert obj == value and type(obj) is KNOWN[key][0], key


@SLOW
@given(data=st.binary(max_size=200) | toml_text.map(str.encode))
def test_any_config_file_loads_or_is_refused_with_the_file_named(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_bytes(data)
        try:
            config.load(str(path))
        except config.ConfigError as exc:
            assert exc.problems and all(p.startswith(f"{path}: ") for p in exc.problems)


regex_fragments = st.lists(
    st.sampled_from(["a", "b", "(", ")", "[", "]", "*", "+", "?", "{2}", "\\", "|", "^", "$",
                     "(?P<n>", "(?i)", "\\d", ".", "{", "}", "(?<=a)", "\\1"]),
    min_size=1, max_size=8,
).map("".join)  # fmt: skip


# re warns about "[[" and the like (a meaning that may change in a later Python): not our concern.
@pytest.mark.filterwarnings("ignore::FutureWarning")
@SLOW
@given(patterns=st.lists(regex_fragments, max_size=3), redact=st.lists(regex_fragments, max_size=2))
def test_the_loader_only_accepts_regexes_the_policy_can_use(
    patterns: list[str], redact: list[str]
) -> None:
    doc = {"escalation": {"patterns": patterns, "redact": [[p, "[x]"] for p in redact]}}
    result = load(doc)
    if isinstance(result, config.ConfigError):
        assert all(
            p.startswith(("f.toml: escalation.patterns: ", "f.toml: escalation.redact: "))
            for p in result.problems
        ), result.problems
        return
    rules = policy.Rules.from_config(result.escalation)
    assert [p.pattern for p in rules.patterns] == patterns


# --- the escalation policy ---------------------------------------------------------------------

ALPHABET = "abcde XYZ"  # what request texts, keywords and patterns are made of
texts = st.text(ALPHABET, max_size=30)
requests = st.builds(
    lambda contents, escalate, private: Request(
        id="r",
        messages=tuple({"role": "user", "content": c} for c in contents),
        escalate=escalate,
        private=private,
    ),
    st.lists(texts, min_size=1, max_size=3),
    st.none() | st.booleans(),
    st.booleans(),
)
rules = st.builds(
    lambda keywords, literals, n, deep, low, threshold, redactions: policy.Rules.from_config(
        EscalationConfig(
            keywords=tuple(keywords),
            patterns=tuple(re.escape(p) for p in literals),
            min_prompt_tokens=n,
            deep_topic=deep,
            low_confidence=low,
            min_mean_logprob=threshold,
            redact=tuple((re.escape(p), "#") for p in redactions),
        )
    ),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    st.integers(0, 40),
    st.booleans(),
    st.booleans(),
    st.floats(-100.0, 0.0),
    st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=3),
)


def expected_reason(
    req: Request, r: policy.Rules, deep: bool, tokens: int
) -> Optional[policy.Reason]:
    """The rules as docs/escalation.md states them, written out independently."""
    if req.private or req.escalate is False:
        return None
    if req.escalate:
        return policy.Reason("flag")
    if deep and r.deep_topic:
        return policy.Reason("topic")
    text = "\n".join(m["content"] for m in req.messages)
    for k in r.keywords:
        if k in text.lower():
            return policy.Reason("keyword", k)
    for p in r.patterns:
        if p.search(text):
            return policy.Reason("pattern", p.pattern)
    if r.min_prompt_tokens and tokens >= r.min_prompt_tokens:
        return policy.Reason("prompt_tokens", f">= {r.min_prompt_tokens}")
    return None


@FAST
@given(req=requests, r=rules, deep=st.booleans(), per_char=st.integers(0, 3))
def test_before_answer_is_total_deterministic_and_as_documented(
    req: Request, r: policy.Rules, deep: bool, per_char: int
) -> None:
    asked: list[str] = []

    def count_tokens(text: str) -> int:
        asked.append(text)
        return len(text) * per_char // 2  # any count, even more tokens than bytes

    first = policy.before_answer(req, r, via_deep_topic=deep, count_tokens=count_tokens)
    assert policy.before_answer(req, r, via_deep_topic=deep, count_tokens=count_tokens) == first
    # A text shorter in bytes than the token limit never reaches the tokenizer.
    assert all(len(t.encode()) >= r.min_prompt_tokens > 0 for t in asked)
    text = policy.request_text(req)
    long_enough = len(text.encode()) >= r.min_prompt_tokens
    tokens = len(text) * per_char // 2 if long_enough else 0
    assert first == expected_reason(req, r, deep, tokens)
    if not policy.may_leave_the_box(req):
        assert first is None and not asked


@FAST
@given(req=requests, r=rules, logprob=st.none() | st.floats(allow_nan=False))
def test_after_answer_asks_for_a_second_opinion_only_when_unsure_and_allowed(
    req: Request, r: policy.Rules, logprob: Optional[float]
) -> None:
    reason = policy.after_answer(req, r, logprob)
    unsure = logprob is not None and logprob < r.min_mean_logprob
    if r.low_confidence and unsure and policy.may_leave_the_box(req):
        assert reason is not None and reason.rule == "low_confidence"
    else:
        assert reason is None


@FAST
@given(r=rules, contents=st.lists(texts, max_size=4), roles=st.data())
def test_redaction_leaves_no_match_behind_and_keeps_the_conversation_shape(
    r: policy.Rules, contents: list[str], roles: st.DataObject
) -> None:
    messages = [
        {"role": roles.draw(st.sampled_from(protocol.ROLES)), "content": c} for c in contents
    ]
    before = copy.deepcopy(messages)
    out = policy.redact_messages(messages, r)
    assert messages == before
    assert [m["role"] for m in out] == [m["role"] for m in messages]
    for original, redacted in zip(messages, out):
        # "#" is outside the patterns' alphabet, so a placeholder never makes a new match; a
        # pattern may still be re-created by a later pattern's replacement, never by its own.
        if not any(p.search(original["content"]) for p, _ in r.redactions):
            assert redacted == original
        last, _ = r.redactions[-1] if r.redactions else (None, None)
        if last is not None:
            assert not last.search(redacted["content"])
