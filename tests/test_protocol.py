"""The request parser: strict, never raises anything but ProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent import protocol
from edgeagent.protocol import Op, ProtocolError, Request


def parse(obj: object) -> Request | Op:
    return protocol.parse(obj, max_tokens_limit=512)


def test_prompt_becomes_one_user_message() -> None:
    req = parse({"id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": False})
    assert isinstance(req, Request)
    assert req.messages == ({"role": "user", "content": "hi"},)
    assert (req.max_tokens, req.temperature, req.stream) == (5, 0.0, False)


def test_messages_and_options() -> None:
    req = parse({"id": "b", "session": "s", "deadline_ms": 100, "stop": ["\n\n"],
                 "messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hi"}]})  # fmt: skip
    assert isinstance(req, Request)
    assert req.session == "s" and req.deadline_ms == 100 and req.stop == ("\n\n",)
    assert len(req.messages) == 2


def test_ops() -> None:
    assert parse({"op": "status"}) == Op("status")
    assert parse({"op": "cancel", "id": "x"}) == Op("cancel", id="x")
    assert parse({"op": "reset", "session": "s"}) == Op("reset", session="s")


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"id": "a", "prompt": "x", "max_tokens": 513}, "max_tokens"),
        ({"id": "a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"id": "a", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"id": "a", "prompt": "x", "temperature": 3}, "temperature"),
        ({"id": "a", "prompt": "x", "stream": "yes"}, "stream"),
        ({"id": "a", "prompt": "x", "stop": "x"}, "stop"),
        ({"id": "a", "prompt": "x", "deadline_ms": 0}, "deadline_ms"),
        ({"id": "a", "prompt": ""}, "prompt"),
        ({"id": "a", "prompt": "x", "messages": []}, "exactly one"),
        ({"id": "a", "messages": []}, "non-empty list"),
        ({"id": "a", "messages": [{"role": "user"}]}, "role"),
        ({"id": "a", "messages": [{"role": "assistant", "content": "x"}]}, "last message"),
        ({"id": "", "prompt": "x"}, "id"),
        ({"id": "x" * 129, "prompt": "x"}, "longer"),
        ({"id": "a", "prompt": "x", "session": 5}, "session"),
        ({"op": "cancel"}, "id"),
        ({"op": "status", "extra": 1}, "unknown field"),
    ],
)
def test_rejections(obj: object, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(obj)
    assert info.value.code == protocol.BAD_REQUEST
    assert fragment in info.value.message


def test_error_carries_the_id_when_it_is_valid() -> None:
    with pytest.raises(ProtocolError) as info:
        parse({"id": "keep", "prompt": 3})
    assert info.value.request_id == "keep"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b'{"a": NaN}', b'{"a": Infinity}', b"", b"[" * 50000])
def test_decode_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.text(max_size=5),
        "prompt": json_values | st.text(max_size=5),
        "messages": json_values,
        "max_tokens": json_values | st.integers(-5, 600),
        "temperature": json_values,
        "stream": json_values,
        "session": json_values,
        "op": st.sampled_from(["status", "cancel", "reset", "x"]) | json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(obj=request_like | json_values)
def test_parser_only_ever_raises_protocol_errors(obj: object) -> None:
    try:
        result = parse(obj)
    except ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST and exc.message
        return
    assert isinstance(result, (Request, Op))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_decode_of_arbitrary_bytes(data: bytes) -> None:
    try:
        protocol.decode(data)
    except ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST


def test_events_encode_as_one_line() -> None:
    line = protocol.encode(protocol.token_event("a", "x\ny"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"event": "token", "id": "a", "text": "x\ny"}


def test_error_messages_quote_little_of_the_input() -> None:
    many_names = {"id": "a", "prompt": "x", **{"\u20ac" * 50 + str(i): 1 for i in range(1000)}}
    for obj in ({"op": "x" * 100_000}, many_names, {"op": "status", "y" * 10_000: 1}):
        with pytest.raises(ProtocolError) as info:
            parse(obj)
        assert "unknown" in info.value.message and len(info.value.message) < 400
    with pytest.raises(ProtocolError, match="and 995 more"):
        parse(many_names)


def test_a_deeply_nested_op_is_a_bad_request() -> None:
    """Transports parse a few calls deeper than the decoder ran, so a value the decoder just
    managed to nest can be too deep for repr() there: messages never repr() such values."""
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ProtocolError, match="unknown op of type list"):
        parse({"op": nested})


def test_a_huge_integer_temperature_is_a_bad_request() -> None:
    with pytest.raises(ProtocolError, match="temperature") as info:
        parse({"id": "t", "prompt": "x", "temperature": 10**400})
    assert info.value.request_id == "t"
