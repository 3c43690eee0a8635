"""Unit tests, no broker and no model: the reply topic check, the Maximum Packet Size edgeagent
asks of a v5 broker, the byte bound of the map that answers a redelivered request once, and
what MqttLink does with one message whose reply topic is bad or whose handling fails.

What mosquitto itself does with the topics refused here (it disconnects a client publishing
one) is exercised against a real broker in tests/test_fuzz_daemon.py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any, Optional, cast

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent import config, protocol
from edgeagent.mqtt_client import connect_properties
from edgeagent.mqtt_link import (
    MQTT_MAX_PACKET,
    RECENT_REQUESTS,
    UNREAD_PROPERTIES_BYTES,
    MqttLink,
    _Delivery,
    largest_request_packet,
    packet_size,
    recent_entry_bytes,
)
from edgeagent.topics import MAX_TOPIC_BYTES, Topics, reply_topic_problem

LIMIT = 512  # [mqtt] max_reply_topic_bytes, its default

GOOD = [
    "replies/me",
    "a",
    "/",
    "a//b",  # empty levels are allowed
    "a/b/",
    "line 3/press A",  # spaces are allowed
    "é/€/😀",
    "a/\ufeff",  # U+FEFF is a character MQTT lets through (MQTT-1.5.4-3)
    "a/\ufffd",
    "a/\u00a0",  # right after the C1 controls
    "a/\ufdcf",  # right before the noncharacters U+FDD0-U+FDEF
    "a/\ufdf0",  # right after them
    "a/\U0010fffd",  # the last character before the last plane's noncharacters
    "a/\u2028",
    "a/\u200b",
    "a$",  # `$` only matters first
    "x" * LIMIT,
    "é" * (LIMIT // 2),  # 512 bytes in 256 characters
]

BAD = [
    # (topic, what the reason says)
    ("", "is empty"),
    ("r/\u0001x", "U+0001"),
    ("r/\x00", "U+0000"),
    ("r/\n", "U+000A"),
    ("r/\r", "U+000D"),
    ("r/\x1b[2J", "U+001B"),
    ("r/\x1f", "U+001F"),
    ("r/\x7f", "U+007F"),
    ("r/\x80", "U+0080"),
    ("r/\x85", "U+0085"),
    ("r/\x9f", "U+009F"),
    ("r/\ufdd0", "U+FDD0"),
    ("r/\ufdef", "U+FDEF"),
    ("r/\ufffe", "U+FFFE"),
    ("r/\uffff", "U+FFFF"),
    ("r/\U0001fffe", "U+1FFFE"),
    ("r/\U0010ffff", "U+10FFFF"),
    ("a/\ud800", "lone surrogate"),
    ("a/\udfff", "lone surrogate"),
    ("\udc80", "lone surrogate"),
    ("$SYS/x", "starts with `$`"),
    ("$SYS/broker/uptime", "starts with `$`"),
    ("$share/g/replies/me", "starts with `$`"),
    ("$", "starts with `$`"),
    ("+", "wildcard"),
    ("#", "wildcard"),
    ("a/+/b", "wildcard"),
    ("a/#", "wildcard"),
    ("a+b", "wildcard"),
    ("x" * (LIMIT + 1), f"longer than {LIMIT} bytes"),
    ("é" * (LIMIT // 2) + "x", f"longer than {LIMIT} bytes"),  # 513 bytes in 257 characters
    ("x" * 65536, f"longer than {LIMIT} bytes"),
    ("x" * 65535, f"longer than {LIMIT} bytes"),  # fine for MQTT, not for edgeagent
    (5, "not a string but int"),
    (None, "not a string but NoneType"),
    (["a"], "not a string but list"),
    ({"a": 1}, "not a string but dict"),
    (True, "not a string but bool"),
    (b"replies/me", "not a string but bytes"),
]


@pytest.mark.parametrize("topic", GOOD)
def test_a_good_reply_topic_is_accepted(topic: str) -> None:
    assert reply_topic_problem(topic, LIMIT) is None
    assert reply_topic_problem(topic, LIMIT) is None


@pytest.mark.parametrize(("topic", "reason"), BAD, ids=[repr(t)[:30] for t, _ in BAD])
def test_a_bad_reply_topic_is_refused_with_its_reason(topic: object, reason: str) -> None:
    problem = reply_topic_problem(topic, LIMIT)
    assert problem is not None and reason in problem, problem
    assert reply_topic_problem(topic, LIMIT) is not None


def test_every_control_character_and_noncharacter_is_refused_and_nothing_else() -> None:
    """The exact set mosquitto's UTF-8 check refuses: C0, DEL, C1 and the 66 noncharacters."""
    refused = {0x7F, *range(0x20), *range(0x80, 0xA0), *range(0xFDD0, 0xFDF0)}
    refused |= {plane << 16 | low for plane in range(17) for low in (0xFFFE, 0xFFFF)}
    assert len(refused) == 32 + 1 + 32 + 66
    wildcards = {ord("+"), ord("#")}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue  # lone surrogates: not UTF-8 at all, refused above
        problem = reply_topic_problem(f"r/{chr(cp)}", LIMIT)
        if cp in refused:
            assert problem == f"holds U+{cp:04X} (a control character or noncharacter)"
        elif cp in wildcards:
            assert problem is not None and "wildcard" in problem
        else:
            assert problem is None, (hex(cp), problem)


def test_the_reason_never_quotes_the_topic() -> None:
    """The reason goes into logs and into the error sent back: nothing a client wrote."""
    marker = "INJECTED-LOG-LINE"
    for topic in [t + marker for t, _ in BAD if isinstance(t, str) and t]:
        problem = reply_topic_problem(topic, LIMIT)
        assert problem is not None and marker not in problem, problem
        assert len(problem) < 80


def test_without_a_limit_mqtts_own_applies() -> None:
    assert reply_topic_problem("x" * MAX_TOPIC_BYTES) is None
    assert reply_topic_problem("x" * (MAX_TOPIC_BYTES + 1)) == "is longer than 65535 bytes"
    assert reply_topic_problem("€" * 21846) == "is longer than 65535 bytes"  # 65538 bytes


# --- the Maximum Packet Size edgeagent asks for -------------------------------------------------


def mqtt_config(**values: object) -> config.Config:
    lines = "".join(f"{k} = {v}\n" for k, v in values.items())
    return config.parse(f'node_id = "press-3"\n[mqtt]\nenabled = true\n{lines}', "test")


def request_topics(cfg: config.Config) -> list[str]:
    t = Topics(cfg.mqtt.topic_prefix, cfg.node_id, cfg.mqtt.shared_group)
    return [t.ask, t.ask_deep, t.group_ask]


@pytest.mark.parametrize("max_payload", [1024, 65536, 1 << 20])
@pytest.mark.parametrize("max_topic", [16, 512, 65535])
def test_the_largest_request_we_read_fits_the_packet_size_we_ask_for(
    max_payload: int, max_topic: int
) -> None:
    """A request at every limit of ours at once (payload, Response Topic, Correlation Data) on
    the longest request topic fits, with the room for unread properties to spare."""
    cfg = mqtt_config(max_payload_bytes=max_payload, max_reply_topic_bytes=max_topic)
    asked = largest_request_packet(cfg.mqtt, request_topics(cfg))
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "r" * max_topic
    props.CorrelationData = b"\xc7" * 65535
    longest = max(request_topics(cfg), key=len)
    largest = packet_size(longest, b"p" * max_payload, 1, props, True)
    assert largest <= asked
    # Only the unread properties' room and the variable-length fields' widest encodings spare.
    assert asked - largest <= UNREAD_PROPERTIES_BYTES + 8


def test_the_packet_size_asked_for_stays_within_what_mqtt_can_frame() -> None:
    cfg = mqtt_config(max_payload_bytes=256 << 20)
    assert largest_request_packet(cfg.mqtt, request_topics(cfg)) == MQTT_MAX_PACKET


def test_connect_properties_carry_the_maximum_packet_size_only_when_given() -> None:
    with_limit = connect_properties(3600, max_packet_size=200_000)
    assert with_limit.MaximumPacketSize == 200_000
    assert with_limit.SessionExpiryInterval == 3600
    # Identifier 0x27 and the four-byte value follow the expiry interval in the packed form.
    assert b"\x27" + (200_000).to_bytes(4, "big") in with_limit.pack()
    without = connect_properties(3600)
    assert not hasattr(without, "MaximumPacketSize")
    assert b"\x27" not in without.pack()[1:]


# --- the redelivery map ----------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def link_with(loop: asyncio.AbstractEventLoop, **mqtt_values: object) -> MqttLink:
    """An MqttLink that never connects; it has no dispatcher, so only its bookkeeping is used."""
    return MqttLink(mqtt_config(**mqtt_values), cast(Any, None), loop, dict)


def request_key(n: int, correlation_bytes: int) -> tuple[str, Optional[bytes], str]:
    return (f"replies/{n}", os.urandom(correlation_bytes), f"id-{n}")


def test_the_redelivery_map_is_bounded_in_bytes_oldest_first(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Requests with 64 KiB of Correlation Data each: at redelivery_mb = 1 about fifteen are
    remembered, not 10,000 (640 MB); evictions are counted in status."""
    link = link_with(loop, redelivery_mb=1)
    keys = [request_key(n, 65535) for n in range(200)]
    for n, key in enumerate(keys):
        assert not link._redelivered(key, _Delivery(n + 1, 1, 0), dup=False)
        assert link._recent_bytes <= 1 << 20
    kept = len(link._recent)
    assert 10 <= kept <= 16, kept
    assert list(link._recent) == keys[-kept:]  # the newest, in order
    assert link._recent_bytes == sum(recent_entry_bytes(k) for k in keys[-kept:])
    status = link.status()
    assert status["redelivery_entries"] == kept
    assert status["redelivery_bytes"] == link._recent_bytes
    assert status["redelivery_evicted"] == len(keys) - kept
    # A remembered one delivered again is recognised; a forgotten one is new again.
    assert link._redelivered(keys[-1], _Delivery(999, 1, 0), dup=True)
    assert not link._redelivered(keys[0], _Delivery(1000, 1, 0), dup=True)
    assert link.counters["duplicates"] == 1


def test_the_redelivery_map_still_holds_at_most_its_entry_count(
    loop: asyncio.AbstractEventLoop,
) -> None:
    link = link_with(loop, redelivery_mb=4096)
    for n in range(RECENT_REQUESTS + 50):
        link._redelivered((f"r/{n}", None, f"id-{n}"), _Delivery(n, 1, 0), dup=False)
    assert len(link._recent) == RECENT_REQUESTS
    assert link.counters["redelivery_evicted"] == 50


def test_the_same_key_again_is_not_counted_twice(loop: asyncio.AbstractEventLoop) -> None:
    """A client reusing its id on its topic (not a redelivery) replaces the entry."""
    link = link_with(loop, redelivery_mb=1)
    key = request_key(1, 100)
    link._redelivered(key, _Delivery(1, 1, 0), dup=False)
    once = link._recent_bytes
    link._redelivered(key, _Delivery(2, 1, 0), dup=False)
    assert link._recent_bytes == once == recent_entry_bytes(key)
    assert len(link._recent) == 1


@pytest.mark.parametrize("correlation_bytes", [0, 16, 1000, 65535])
def test_the_byte_count_is_what_the_map_really_holds(
    loop: asyncio.AbstractEventLoop, correlation_bytes: int
) -> None:
    """The estimate per entry against the memory Python allocates for it (tracemalloc), with
    the keys built fresh so that the map is all that keeps them."""
    link = link_with(loop, redelivery_mb=4096)
    n = 2000 if correlation_bytes < 65535 else 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            if i % 2:
                key: tuple[Any, ...] = request_key(i, correlation_bytes)
            else:  # a refused message's key
                key = ("refused", f"r/{i}", os.urandom(correlation_bytes),
                       hashlib.sha256(b"%d" % i).digest())  # fmt: skip
            link._redelivered(key, _Delivery(i, 1, 0), dup=False)
            del key
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = link._recent_bytes
    # The bound holds as long as the estimate does not fall short of what is held. How much
    # less is held depends on the allocator (when the map's table grows, how small objects
    # pack): here 0.78 of the estimate with 16 bytes of correlation data, 0.85-1.0 otherwise.
    # The lower side only guards against an estimate so generous that redelivery_mb means little.
    assert 0.6 * counted <= held <= 1.1 * counted, (held / n, counted / n, sys.version)


# --- one message through MqttLink, with stand-ins for paho's network side and the hub ----------


class RecordingClient:
    """Stands in for the paho client's sending side: keeps what MqttLink publishes and acks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any], Optional[bytes]]] = []
        self.acks: list[tuple[int, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool,
                props: Optional[Properties]) -> Any:  # fmt: skip
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self.published.append((topic, json.loads(payload), corr))
        return type("Info", (), {"rc": 0, "mid": 100 + len(self.published)})()

    def ack(self, mid: int, qos: int) -> int:
        self.acks.append((mid, qos))
        return 0


class FakeDispatcher:
    """A fake hub: counts errors like the real one; `fail` makes it raise for every request."""

    def __init__(self, fail: bool = False) -> None:
        self.stats = type("Stats", (), {"errors": collections.Counter()})()
        self.fail = fail
        self.handled: list[Any] = []
        self.sinks: list[Any] = []

    def handle_decoded(self, obj: Any, sink: Any, via_deep_topic: bool = False) -> None:
        if self.fail:
            raise RuntimeError("a bug nobody foresaw")
        self.handled.append(obj)
        self.sinks.append(sink)


def wired_link(loop: asyncio.AbstractEventLoop,
               dispatcher: FakeDispatcher) -> tuple[MqttLink, RecordingClient]:  # fmt: skip
    link = MqttLink(mqtt_config(), cast(Any, dispatcher), loop, dict)
    client = RecordingClient()
    link._client = cast(Any, client)
    return link, client


def deliver(link: MqttLink, payload: dict[str, Any], response_topic: Optional[str] = None,
            mid: int = 7) -> None:  # fmt: skip
    link._inbound(link.topics.ask, json.dumps(payload).encode(), response_topic, b"c", mid, 1,
                  False)  # fmt: skip


@pytest.mark.parametrize("bad", ["r/\u0001x", "a/\ud800", "$SYS/x", "a/#", "", 5, "x" * 600,
                                 # the box's own topics: a PLC's answers, the box's status
                                 "edgeagent/press-3/answer/alarm", "edgeagent/press-3/status",
                                 "edgeagent/ask"])  # fmt: skip
def test_a_request_with_only_a_bad_reply_to_is_dropped_acknowledged_and_counted(
    loop: asyncio.AbstractEventLoop, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = FakeDispatcher()
    link, client = wired_link(loop, dispatcher)
    with caplog.at_level(logging.INFO, logger="edgeagent.mqtt"):
        deliver(link, {"id": "q", "prompt": "hi", "reply_to": bad})
    assert client.published == [] and dispatcher.handled == []
    assert client.acks == [(7, 1)]  # once, so that the broker does not deliver it again
    assert link.counters["dropped"] == link.counters["bad_reply_topic"] == 1
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    line = caplog.records[0].getMessage()
    assert line.startswith("dropping a request on edgeagent/press-3/ask with no way to reply: ")
    assert not isinstance(bad, str) or not bad or bad not in line


def test_a_bad_reply_topic_is_refused_on_the_other_valid_one(
    loop: asyncio.AbstractEventLoop,
) -> None:
    dispatcher = FakeDispatcher()
    link, client = wired_link(loop, dispatcher)
    deliver(link, {"id": "a", "prompt": "hi", "reply_to": "r/\u0001x"}, "replies/rt", mid=1)
    deliver(link, {"id": "b", "prompt": "hi", "reply_to": "replies/to"}, "$SYS/x", mid=2)
    deliver(link, {"id": "c", "prompt": "hi", "reply_to": "replies/ok"}, None, mid=3)
    assert [(t, e["event"], e.get("id"), c) for t, e, c in client.published] == [
        ("replies/rt", "error", "a", b"c"),
        ("replies/to", "error", "b", b"c"),
    ]
    assert client.published[0][1]["message"].startswith("`reply_to` holds U+0001")
    assert (
        client.published[1][1]["message"]
        == "the Response Topic starts with `$` (topics the broker keeps for itself)"
    )
    assert [o["id"] for o in dispatcher.handled] == ["c"]
    assert link.counters["bad_reply_topic"] == 2 and link.counters["dropped"] == 0
    assert dispatcher.stats.errors[protocol.BAD_REQUEST] == 2


def test_an_unforeseen_failure_stays_with_its_message(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing escapes into the event loop; the message is acknowledged and counted."""
    link, client = wired_link(loop, FakeDispatcher(fail=True))
    with caplog.at_level(logging.ERROR, logger="edgeagent.mqtt"):
        deliver(link, {"id": "q", "prompt": "hi"}, "replies/me")
    assert client.acks == [(7, 1)]
    assert link.counters["inbound_errors"] == 1
    assert "unexpected failure reading a message on edgeagent/press-3/ask" in caplog.text


def test_publish_reply_never_hands_paho_a_bad_topic(loop: asyncio.AbstractEventLoop) -> None:
    """Defence in depth: whatever reached it, a topic a broker refuses is not published."""
    link, client = wired_link(loop, FakeDispatcher())
    event = protocol.error_event("q", protocol.BAD_REQUEST, "x")
    for topic in ["r/\u0001x", "a/\ud800", "a/+", "$SYS/x", "", "a/\ufffe"]:
        assert link.publish_reply(topic, event, None, 1) is None
    assert link.publish_reply("x" * 65535, event, None, 1) is not None  # MQTT's limit, not ours
    assert [t for t, _, _ in client.published] == ["x" * 65535]
    assert link.counters["replies_bad_topic"] == 6


def test_kb_topics_give_requests_their_default_kb(loop: asyncio.AbstractEventLoop) -> None:
    """[mqtt.kb]: "ask" covers the node's other request topics; a named topic is subscribed,
    takes plain text, and answers on answer/<name>; a request that says `kb` keeps it."""
    dispatcher = FakeDispatcher()
    cfg = mqtt_config(kb='{ "ask" = true, "ask/manuals" = ["line-4"], "ask/alarm" = false }')
    link = MqttLink(cfg, cast(Any, dispatcher), loop, dict)
    link._client = cast(Any, RecordingClient())
    manuals = "edgeagent/press-3/ask/manuals"
    assert set(link.topics.subscriptions()) == {
        "edgeagent/press-3/ask",
        manuals,
        "edgeagent/press-3/ask/alarm",
    }
    assert link._named_topics() == {
        "kb_topics": ["edgeagent/press-3/ask", manuals, "edgeagent/press-3/ask/alarm"]
    }

    def send(topic: str, payload: bytes) -> Any:
        link._inbound(topic, payload, "replies/r", b"c", 7, 1, False)
        return dispatcher.handled.pop()

    ask = json.dumps({"id": "a", "prompt": "hi"}).encode()
    assert send(link.topics.ask, ask)["kb"] is True
    assert send(link.topics.group_ask, ask)["kb"] is True
    assert send(link.topics.ask, json.dumps({"id": "b", "prompt": "hi", "kb": False}).encode())[
        "kb"
    ] is False  # fmt: skip
    plain = send(manuals, b"torque for the M8 bolts?")
    assert plain["kb"] == ["line-4"] and plain["prompt"] == "torque for the M8 bolts?"
    assert plain["stream"] is False
    assert send("edgeagent/press-3/ask/alarm", ask)["kb"] is False
    # A machine's structured question uses the manuals only when it asks.
    shaped = {"id": "f", "prompt": "hi", "format": {"type": "object"}}
    assert "kb" not in send(link.topics.ask, json.dumps(shaped).encode())
    # Control operations are left as they are.
    assert "kb" not in send(link.topics.ask, json.dumps({"op": "status"}).encode())
    # Without a reply topic, a named topic's answer goes to answer/<name>.
    link._inbound(manuals, b"where is the E-stop?", None, None, 8, 1, False)
    assert dispatcher.sinks[-1].topic == "edgeagent/press-3/answer/manuals"
    assert dispatcher.sinks[-1].question == "where is the E-stop?"
