"""Malformed input against a real daemon, a real mosquitto and the real model.

Over 10,000 malformed messages on the Unix socket (several connections, pipelined) and as many
over MQTT (v5 with and without Response Topic and Correlation Data, v3.1.1 with and without
`reply_to`, payloads up to the broker's maximum packet size): every message that has a reply
address gets exactly one `bad_request`, carrying its id when the id was readable; the daemon
stays up and connected to the broker, never runs the model for them, and then answers a normal
request. The corpus is generated from a seed (tests/fuzz_corpus.py).

Hostile reply topics (control characters, lone surrogates, noncharacters, `$` topics, wildcards,
empty, too long, not strings), in `reply_to` and in the v5 Response Topic, from v5 and v3.1.1
clients among valid requests: each is refused on the request's other, valid reply address or
dropped, nothing is published to it, and the daemon's link never drops. A message larger than
the Maximum Packet Size the daemon asks of the broker never reaches it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent import protocol
from tests import fuzz_corpus
from tests.conftest import Conn, Daemon, connect
from tests.mqtt_helpers import Broker, Requester
from tests.reliability import record

SEED = 20261125
CORPUS_SIZE = 10_000  # random entries; the fixed boundary cases come on top
MQTT_CORPUS_SIZE = 11_500  # a tenth go without a way to reply: over 10,000 still have one
LINE_LIMIT = 64 * 1024  # [socket] max_line_bytes and [mqtt] max_payload_bytes
BROKER_MAX_PACKET = 128 * 1024  # mosquitto's max_packet_size (announced to v5 clients)
SOCKET_CONNECTIONS = 4
MQTT_WINDOW = 200  # requests awaiting their reply, per run: well inside the broker's queue
NODE = "fuzz-node"
ASK = f"edgeagent/{NODE}/ask"
MAX_ERROR_MESSAGE = 512


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("fuzz-broker"))
    # Per-message debug logging would cost more than the daemon's work; limits as a box has them.
    conf = b.conf.read_text().replace(
        "log_type all\n",
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
    )
    b.conf.write_text(conf + f"max_packet_size {BROKER_MAX_PACKET}\nmax_queued_messages 5000\n")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fuzz_daemon(fuzz_broker: Broker, daemon_factory: Callable[..., Daemon]) -> Daemon:
    extra = (
        f"max_line_bytes = {LINE_LIMIT}\n"  # the [socket] table is the last one of the base
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {fuzz_broker.port}\n'
        f"reconnect_min_s = 1\nreconnect_max_s = 2\nmax_payload_bytes = {LINE_LIMIT}\n"
    )
    d = daemon_factory(node_id=NODE, extra=extra)
    r = Requester(fuzz_broker.port)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")  # subscribed: requests reach it from now on
    finally:
        r.close()
    return d


LONG_NODE = "fuzz-long"  # as long a name as NODE: its requests are as large
LONG_ASK = f"edgeagent/{LONG_NODE}/ask"


@pytest.fixture(scope="module")
def long_topic_daemon(fuzz_broker: Broker, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon taking reply topics as long as MQTT allows (65535 bytes, not the default 512),
    so that a reply can be made larger than the broker's maximum packet size."""
    extra = (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {fuzz_broker.port}\n'
        f"reconnect_min_s = 1\nreconnect_max_s = 2\nmax_payload_bytes = {LINE_LIMIT}\n"
        "max_reply_topic_bytes = 65535\n"
    )
    d = daemon_factory(node_id=LONG_NODE, extra=extra)
    r = Requester(fuzz_broker.port)
    try:
        r.wait_online(f"edgeagent/{LONG_NODE}/status")
    finally:
        r.close()
    return d


def status(d: Daemon) -> dict[str, Any]:
    with connect(d.socket_path) as c:
        return c.op("status")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_healthy(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    assert "Traceback" not in d.log(), d.log()[-5000:]


# --- MQTT clients for the test -----------------------------------------------------------------


class Collector:
    """A real MQTT v5 client subscribed to every reply topic of a run (or to `filters`),
    keeping each message."""

    def __init__(self, port: int, prefix: str, filters: Sequence[str] = ()) -> None:
        self.prefix = prefix
        self.got: dict[str, list[tuple[bytes, Optional[bytes]]]] = collections.defaultdict(list)
        self.count = 0
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"collect-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters or [f"{prefix}/#"]])
        assert subscribed.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        with self.cond:
            self.got[msg.topic].append((bytes(msg.payload), corr))
            self.count += 1
            self.cond.notify_all()

    def wait_for(self, topic: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.got.get(topic):
                assert self.cond.wait(max(0.01, deadline - time.monotonic())), topic
            return dict(json.loads(self.got[topic][-1][0]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(port: int, v5: bool) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )  # fmt: skip
    client.max_inflight_messages_set(100)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    assert connected.wait(10)
    return client


def v5_properties(response_topic: Optional[str], correlation: Optional[bytes]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def publish_packet_size(topic: str, payload: bytes, response_topic: Optional[str],
                        correlation: Optional[bytes], v5: bool = True) -> int:  # fmt: skip
    """Bytes of a QoS 1 PUBLISH packet, counted from the MQTT specification."""

    def varint_len(n: int) -> int:
        return 1 + (n >= 128) + (n >= 16_384) + (n >= 2_097_152)

    props = 0
    if response_topic is not None:
        props += 3 + len(response_topic.encode())
    if correlation is not None:
        props += 3 + len(correlation)
    remaining = 2 + len(topic.encode()) + 2 + len(payload)
    if v5:
        remaining += varint_len(props) + props
    return 1 + varint_len(remaining) + remaining


# --- what a reply should be, from docs/protocol.md and docs/mqtt.md ------------------------------


def socket_expected_id(payload: bytes) -> Optional[str]:
    if len(payload) > LINE_LIMIT:
        return None
    return fuzz_corpus.readable_id(payload.rstrip(b"\r"))


MAX_REPLY_TOPIC = 512  # [mqtt] max_reply_topic_bytes, its default


def valid_topic(topic: object) -> bool:
    """A reply topic the daemon publishes to, from docs/mqtt.md: UTF-8 within max_reply_topic_bytes,
    not under `$`, no wildcard, no character mosquitto refuses (controls, noncharacters)."""
    if not isinstance(topic, str) or not topic or topic.startswith("$"):
        return False
    try:
        if len(topic.encode("utf-8")) > MAX_REPLY_TOPIC:
            return False
    except UnicodeEncodeError:  # a lone surrogate
        return False
    for c in topic:
        cp = ord(c)
        if c in "+#" or cp < 0x20 or 0x7F <= cp <= 0x9F:
            return False
        if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:  # noncharacters
            return False
    return True


ANY_HEX_ID = "<a random hex id>"
UNREADABLE = object()


def json_outcomes(payload: bytes) -> list[Any]:
    """What the daemon's strict decoder may read from `payload`. Nesting near Python's
    recursion limit decodes or not depending on how deep the stack is when the decoder runs,
    so such a payload has two outcomes: unreadable, or what a fresh stack reads."""

    def read() -> Any:
        try:
            return json.loads(payload.decode("utf-8"), parse_constant=fuzz_corpus.refuse_constant)
        except (UnicodeDecodeError, ValueError):
            return UNREADABLE

    try:
        return [read()]
    except RecursionError:
        pass
    fresh: list[Any] = [UNREADABLE]

    def read_on_a_fresh_stack() -> None:
        with contextlib.suppress(RecursionError):
            fresh[0] = read()

    thread = threading.Thread(target=read_on_a_fresh_stack)
    thread.start()
    thread.join()
    return [UNREADABLE, fresh[0]] if fresh[0] is not UNREADABLE else [UNREADABLE]


def mqtt_expectation(
    payload: bytes, response_topic: Optional[str], correlation: Optional[bytes]
) -> tuple[set[Optional[str]], set[Optional[str]]]:
    """The reply topics (None: the request has no way to reply) and the ids its error may
    carry, from docs/mqtt.md. A bad Response Topic or `reply_to` gets the request refused on
    the other one when that is valid."""
    bad_rt = response_topic is not None and not valid_topic(response_topic)
    topic = None if bad_rt else response_topic
    if len(payload) > LINE_LIMIT:
        return {topic}, {None}
    topics, ids = set(), set()
    for obj in json_outcomes(payload):
        t, rid = topic, fuzz_corpus.valid_id(obj)
        if isinstance(obj, dict) and "reply_to" in obj:
            reply_to = obj.pop("reply_to")
            rid = fuzz_corpus.valid_id(obj)
            if not valid_topic(reply_to):  # refused as it is, on the Response Topic if any
                topics.add(t)
                ids.add(rid)
                continue
            t = topic or reply_to
        if bad_rt:  # refused on the reply_to, if any
            topics.add(t)
            ids.add(rid)
            continue
        if isinstance(obj, dict) and "op" not in obj and "id" not in obj and t is not None:
            # v5 clients may leave the id out: the correlation data in hex, or a random one
            rid = correlation.hex()[:64] if correlation else ANY_HEX_ID
        topics.add(t)
        ids.add(rid)
    return topics, ids


def check_error(event: dict[str, Any], expected_ids: set[Optional[str]]) -> None:
    assert event["event"] == "error" and event["code"] == protocol.BAD_REQUEST, event
    assert event["message"] and len(event["message"]) <= MAX_ERROR_MESSAGE, event
    rid = event["id"]
    random_hex = (
        isinstance(rid, str) and len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)
    )
    assert rid in expected_ids or (ANY_HEX_ID in expected_ids and random_hex), (event, expected_ids)


# --- focused cases ----------------------------------------------------------------------------


def test_a_line_just_over_the_limit_is_refused_however_it_arrives(fuzz_daemon: Daemon) -> None:
    """A line over max_line_bytes is refused even when it arrives whole in one read."""
    request = json.dumps({"id": "long", "prompt": "Say OK.", "max_tokens": 2}).encode()
    with connect(fuzz_daemon.socket_path) as c:
        c.send_raw(request + b" " * (LINE_LIMIT + 1 - len(request)) + b"\n")
        event = c.read()
        assert event["event"] == "error" and event["id"] is None, event
        assert f"line longer than {LINE_LIMIT} bytes" in event["message"]
        c.send_raw(request + b" " * (LINE_LIMIT - len(request)) + b"\n")  # exactly the limit
        done = c.until_final("long")[-1]
        assert done["event"] == "done" and done["text"], done


def test_mqtt_ids_of_every_json_type_get_one_error_each(
    fuzz_broker: Broker, fuzz_daemon: Daemon
) -> None:
    run = f"fuzz/ids-{uuid.uuid4().hex[:6]}"
    collector = Collector(fuzz_broker.port, run)
    pub = publisher(fuzz_broker.port, v5=True)
    try:
        ids: list[Any] = [[1], {"a": 1}, 5, 1.5, True, None, "", "x" * 129, [[[]]]]
        for n, rid in enumerate(ids):
            payload = json.dumps({"id": rid, "prompt": "Say OK."}).encode()
            props = v5_properties(f"{run}/{n}", b"c%d" % n)
            pub.publish(ASK, payload, 1, False, props).wait_for_publish(10)
        for n in range(len(ids)):
            event = collector.wait_for(f"{run}/{n}")
            assert event["event"] == "error" and event["id"] is None, event
            assert "`id`" in event["message"]
        # A status op after them: its answer comes after any second answer to the above.
        pub.publish(ASK, b'{"op": "status"}', 1, False, v5_properties(f"{run}/end", None))
        assert collector.wait_for(f"{run}/end")["event"] == "status"
        assert all(len(v) == 1 for v in collector.got.values()), dict(collector.got)
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.close()
    assert_healthy(fuzz_daemon)


def test_a_reply_too_large_for_the_broker_is_dropped_and_the_link_stays_up(
    fuzz_broker: Broker, long_topic_daemon: Daemon
) -> None:
    """A Response Topic and Correlation Data sized so that the request fits the broker's
    maximum packet size but the error about it may not: exactly at the maximum it is sent;
    over it (by one byte, which the specification forbids and mosquitto happens to let
    through, or by more, for which mosquitto disconnects the sender) it is dropped. (With
    reply topics of at most the default 512 bytes no error can grow that large.)"""
    run = f"fuzz/big-{uuid.uuid4().hex[:6]}"
    collector = Collector(fuzz_broker.port, run)
    pub = publisher(fuzz_broker.port, v5=True)
    before = status(long_topic_daemon)["mqtt"]
    try:
        correlation = b"\xc7" * 65535
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.decode(b"{")
        error = protocol.encode(
            protocol.error_event(None, protocol.BAD_REQUEST, info.value.message)
        )
        for name, extra in (("fits", 0), ("over", 1), ("far-over", 64)):
            stem = f"{run}/{name}/"
            fixed = publish_packet_size(stem, error[:-1], None, correlation) - len(stem)
            topic = stem + "t" * (BROKER_MAX_PACKET + extra - fixed - len(stem))
            assert publish_packet_size(topic, error[:-1], None, correlation) == (
                BROKER_MAX_PACKET + extra
            )
            assert publish_packet_size(LONG_ASK, b"{", topic, correlation) <= BROKER_MAX_PACKET
            props = v5_properties(topic, correlation)
            pub.publish(LONG_ASK, b"{", 1, False, props).wait_for_publish(10)
            if name == "fits":
                event = collector.wait_for(topic)
                assert event["event"] == "error" and event["code"] == protocol.BAD_REQUEST
                assert collector.got[topic][0][1] == correlation
        # The link is still up: a status op on a short topic is answered after the dropped one.
        pub.publish(LONG_ASK, b'{"op": "status"}', 1, False, v5_properties(f"{run}/s", b"s"))
        assert collector.wait_for(f"{run}/s")["event"] == "status"
        after = status(long_topic_daemon)["mqtt"]
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.close()
    assert not [t for t in collector.got if "over/" in t]
    assert after.get("replies_too_large", 0) == before.get("replies_too_large", 0) + 2
    assert after.get("disconnects", 0) == before.get("disconnects", 0) == 0
    assert "over the broker's maximum packet size of 131072" in long_topic_daemon.log()
    assert_healthy(long_topic_daemon)


# --- the corpus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[fuzz_corpus.Entry]:
    return fuzz_corpus.build(SEED, CORPUS_SIZE, LINE_LIMIT)


BLANK_LINES = [b"", b" ", b"\t", b"\r", b" \r", b"\x0b\x0c"]  # no reply: nothing was asked


def socket_session(path: str, entries: list[fuzz_corpus.Entry], seed: int,
                   chunked: bool) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Pipeline every entry as a line, with blank lines between some, then a status op as a
    sentinel; return every event received before the sentinel's answer, and the blank lines.
    Odd sessions write in random small pieces, so lines arrive split at any byte."""
    rng = random.Random(seed)
    lines = []
    blanks = 0
    for entry in entries:
        lines.append(entry.payload + b"\n")
        if rng.random() < 0.01:
            lines.append(rng.choice(BLANK_LINES) + b"\n")
            blanks += 1
    data = b"".join(lines) + b'{"op": "status"}\n'
    with Conn(path, timeout=120) as conn:

        def write() -> None:
            view, i = memoryview(data), 0
            while i < len(view):
                n = rng.randrange(1, 4096) if chunked else 1 << 20
                conn.sock.sendall(view[i : i + n])
                i += n

        writer = threading.Thread(target=write)
        writer.start()
        events = []
        while (event := conn.read())["event"] != "status":
            events.append(event)
        writer.join()
    return events, blanks


def test_malformed_lines_over_the_socket_each_get_one_error(
    fuzz_daemon: Daemon, corpus: list[fuzz_corpus.Entry]
) -> None:
    before = status(fuzz_daemon)
    shares = [corpus[i::SOCKET_CONNECTIONS] for i in range(SOCKET_CONNECTIONS)]
    results: list[tuple[list[dict[str, Any]], int]] = [([], 0)] * SOCKET_CONNECTIONS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = socket_session(fuzz_daemon.socket_path, shares[i], SEED + i, i % 2 == 1)
        except BaseException as exc:  # reported below, with the daemon's state
            errors.append(exc)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(SOCKET_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert not errors, (errors, fuzz_daemon.log()[-3000:])

    answered = lost = duplicated = 0
    for share, (events, _blanks) in zip(shares, results):
        # Answers on one connection come in the order of its lines.
        lost += max(0, len(share) - len(events))
        duplicated += max(0, len(events) - len(share))
        for entry, event in zip(share, events):
            check_error(event, {socket_expected_id(entry.payload)})
            if len(entry.payload) > LINE_LIMIT:
                assert event["message"] == f"line longer than {LINE_LIMIT} bytes; skipped"
            answered += 1
    assert (lost, duplicated) == (0, 0)

    # Still serving, and none of that reached the model.
    with connect(fuzz_daemon.socket_path) as c:
        c.send({"id": "after", "prompt": "What does CNC stand for?", "max_tokens": 16})
        events = c.until_final("after")
    done = events[-1]
    assert done["event"] == "done" and "numerical control" in done["text"].lower(), done
    assert "".join(e["text"] for e in events[:-1]) == done["text"]
    after = status(fuzz_daemon)
    assert after["requests_served"] - before["requests_served"] == 1
    bad = after["errors"].get("bad_request", 0) - before["errors"].get("bad_request", 0)
    assert bad == len(corpus)
    assert_healthy(fuzz_daemon)

    kinds = collections.Counter(e.kind for e in corpus)
    record(
        "fuzz: malformed lines over the Unix socket",
        category="fuzz",
        load=f"{len(corpus)} lines pipelined on {SOCKET_CONNECTIONS} connections at once",
        faults="malformed input",
        inputs=", ".join(f"{kind} ({n})" for kind, n in sorted(kinds.items())),
        accepted=len(corpus),
        answered=answered,
        lost=lost,
        duplicated=duplicated,
        figures={
            "messages_sent": len(corpus),
            "blank_lines_sent_no_reply_expected": sum(b for _, b in results),
            "bytes_sent": sum(len(e.payload) + 1 for e in corpus),
            "largest_line_bytes": max(len(e.payload) for e in corpus),
            "lines_over_max_line_bytes": sum(len(e.payload) > LINE_LIMIT for e in corpus),
            "max_line_bytes": LINE_LIMIT,
            "connections": SOCKET_CONNECTIONS,
            "model_runs_caused": after["requests_served"] - before["requests_served"] - 1,
            "rss_mb_before": before["rss_mb"],
            "rss_mb_after": after["rss_mb"],
            "seconds_to_send_and_answer": round(elapsed, 1),
        },
    )


MQTT_MODES = {
    # name: (weight, protocol v5?, Response Topic?, Correlation Data?, reply_to in the payload)
    "v5, response topic and correlation data": (30, True, True, True, None),
    "v5, response topic": (12, True, True, False, None),
    "v5, reply_to": (10, True, False, False, "valid"),
    "v5, response topic and an invalid reply_to": (5, True, True, True, "invalid"),
    "v5, invalid reply_to only": (3, True, False, False, "invalid"),
    "v5, no reply address": (3, True, False, False, None),
    "v3.1.1, reply_to": (25, False, False, False, "valid"),
    "v3.1.1, invalid reply_to only": (3, False, False, False, "invalid"),
    "v3.1.1, no reply address": (3, False, False, False, None),
}
INVALID_REPLY_TO = [
    "", "a/+/b", "#", "+", "fuzz/#", "t\u0000", 5, None, [], {}, True, "x" * 65536, "r/\u0001x",
    "a/\ud800", "a/\x1b[2J", "a/\x85", "a/\ufffe", "$SYS/x", "x" * (MAX_REPLY_TOPIC + 1),
]  # fmt: skip


def with_reply_to(payload: bytes, value: Any) -> bytes:
    """The payload with `"reply_to": value` added as its first field, when it is an object."""
    i = payload.find(b"{")
    if i < 0 or payload[:i].strip():
        return payload
    return payload[: i + 1] + b'"reply_to":' + json.dumps(value).encode() + b"," + payload[i + 1 :]


class Plan:
    """One MQTT message: what is published, and what should come back."""

    def __init__(self, n: int, mode: str, payload: bytes, qos: int, response_topic: Optional[str],
                 correlation: Optional[bytes], kind: str) -> None:  # fmt: skip
        self.n, self.mode, self.payload, self.qos = n, mode, payload, qos
        self.response_topic, self.correlation, self.kind = response_topic, correlation, kind
        self.v5 = MQTT_MODES[mode][1]
        topics, self.expected_ids = mqtt_expectation(payload, response_topic, correlation)
        assert len(topics) == 1, (mode, payload[:100])  # where the reply goes is known
        self.reply_topic = topics.pop()


def plan_messages(corpus: list[fuzz_corpus.Entry], run: str, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    names = list(MQTT_MODES)
    weights = [MQTT_MODES[m][0] for m in names]
    plans = []
    # Larger entries than a request may be go over the socket only.
    entries = [e for e in corpus if len(e.payload) <= LINE_LIMIT + 2]
    for n, entry in enumerate(entries):
        mode = rng.choices(names, weights)[0]
        _w, _v5, has_rt, has_corr, reply_to = MQTT_MODES[mode]
        payload = entry.payload
        if reply_to and len(json_outcomes(payload)) > 1:
            # Whether the decoder reads such nesting decides whether it finds the reply_to:
            # give these a Response Topic instead.
            mode = names[0]
            _w, _v5, has_rt, has_corr, reply_to = MQTT_MODES[mode]
        if reply_to == "valid":
            payload = with_reply_to(payload, f"{run}/{n}")
        elif reply_to == "invalid":
            value = rng.choice(INVALID_REPLY_TO)
            if len(payload) + len(json.dumps(value)) > LINE_LIMIT:
                value = "a/+/b"  # keep the packet within the broker's limit
            payload = with_reply_to(payload, value)
        corr = None
        if has_corr:
            corr = rng.choice(
                [b"", b"\x00" * 8, rng.randbytes(16), rng.randbytes(1000), b"c%d" % n]
            )
        rt = f"{run}/{n}" if has_rt else None
        plan = Plan(n, mode, payload, 0 if rng.random() < 0.1 else 1, rt, corr, entry.kind)
        if reply_to == "valid" and plan.reply_topic is None:
            # Not an object the reply_to could go into: give it a Response Topic instead.
            plan = Plan(n, names[0], entry.payload, plan.qos, f"{run}/{n}", b"c%d" % n, entry.kind)
        plans.append(plan)
    # Payloads that fill the broker's maximum packet size exactly, with and without a way to
    # reply: over the daemon's limit, so refused unread.
    kind = "payload at the broker's maximum packet size"
    for mode in ("v5, response topic and correlation data", "v3.1.1, no reply address"):
        n = len(plans)
        _w, v5, has_rt, has_corr, _r = MQTT_MODES[mode]
        rt, corr = (f"{run}/{n}" if has_rt else None), (b"max" if has_corr else None)
        overhead = publish_packet_size(ASK, b"x" * LINE_LIMIT, rt, corr, v5) - LINE_LIMIT
        size = BROKER_MAX_PACKET - overhead
        payload = fuzz_corpus.sized(kind, size, rng).payload
        plans.append(Plan(n, mode, payload, 1, rt, corr, kind))
    return plans


def end_of_run(v5: mqtt.Client, v3: mqtt.Client, collector: Collector, run: str,
               daemon: Daemon, before: dict[str, Any], sent: int) -> dict[str, Any]:  # fmt: skip
    """Status ops after everything, from both publishers (answered after any late reply), then
    the daemon's status once it has counted every message: `sent` plus those two."""
    v5.publish(ASK, b'{"op": "status"}', 1, False, v5_properties(f"{run}/end-v5", None))
    v3.publish(ASK, json.dumps({"op": "status", "reply_to": f"{run}/end-v3"}), 1)
    collector.wait_for(f"{run}/end-v5")
    collector.wait_for(f"{run}/end-v3")
    received = before["mqtt"].get("received", 0) + sent + 2
    wait_until(
        lambda: status(daemon)["mqtt"].get("received", 0) == received,
        "the daemon to count every message",
    )
    return status(daemon)


def test_malformed_payloads_over_mqtt_each_get_one_error(
    fuzz_broker: Broker, fuzz_daemon: Daemon
) -> None:
    run = f"fuzz/{uuid.uuid4().hex[:8]}"
    plans = plan_messages(fuzz_corpus.build(SEED + 1, MQTT_CORPUS_SIZE, LINE_LIMIT), run, SEED)
    expected = {p.reply_topic: p for p in plans if p.reply_topic is not None}
    assert len(expected) == sum(p.reply_topic is not None for p in plans)  # one topic each
    assert len(expected) >= 10_000
    dropped = sum(p.reply_topic is None for p in plans)
    for p in plans:
        assert publish_packet_size(ASK, p.payload, p.response_topic, p.correlation, p.v5) <= (
            BROKER_MAX_PACKET
        )
    collector = Collector(fuzz_broker.port, run)
    v5, v3 = publisher(fuzz_broker.port, v5=True), publisher(fuzz_broker.port, v5=False)
    before = status(fuzz_daemon)
    t0 = time.monotonic()
    try:
        published_with_reply = 0
        for p in plans:
            if p.reply_topic is not None:
                published_with_reply += 1
                with collector.cond:  # keep the broker's queue for the daemon short
                    while published_with_reply - collector.count > MQTT_WINDOW:
                        assert collector.cond.wait(60), "no reply for 60 s"
            props = v5_properties(p.response_topic, p.correlation) if p.v5 else None
            (v5 if p.v5 else v3).publish(ASK, p.payload, p.qos, False, props)
        with collector.cond:
            deadline = time.monotonic() + 120
            while collector.count < len(expected):
                assert collector.cond.wait(max(0.01, deadline - time.monotonic())), (
                    f"{len(expected) - collector.count} replies missing"
                )
        middle = end_of_run(v5, v3, collector, run, fuzz_daemon, before, len(plans))
        elapsed = time.monotonic() - t0

        # A normal request, each way, is answered as usual.
        v5.publish(
            ASK, json.dumps({"id": "after-v5", "prompt": "What does CNC stand for?",
                             "max_tokens": 16, "stream": False}),
            1, False, v5_properties(f"{run}/after-v5", b"after"),
        )  # fmt: skip
        done = collector.wait_for(f"{run}/after-v5")
        assert done["event"] == "done" and done["id"] == "after-v5", done
        assert "numerical control" in done["text"].lower()
        assert collector.got[f"{run}/after-v5"][0][1] == b"after"
        normal = {"id": "after-v3", "reply_to": f"{run}/after-v3", "prompt": "Say OK.",
                  "max_tokens": 4, "stream": False}  # fmt: skip
        v3.publish(ASK, json.dumps(normal), 1)
        done = collector.wait_for(f"{run}/after-v3")
        assert done["event"] == "done" and done["id"] == "after-v3" and done["text"], done
        after = status(fuzz_daemon)
    finally:
        for client in (v5, v3):
            client.disconnect()
            client.loop_stop()
        collector.close()

    answered = lost = duplicated = 0
    for topic, p in expected.items():
        replies = collector.got.get(topic, [])
        lost += not replies
        duplicated += max(0, len(replies) - 1)
        if replies:
            payload, corr = replies[0]
            check_error(json.loads(payload), p.expected_ids)
            assert corr == (p.correlation if p.correlation else None) or (
                p.correlation == b"" and corr in (b"", None)
            ), (p.mode, corr)
            answered += 1
    unexpected = (
        set(collector.got)
        - set(expected)
        - {f"{run}/{name}" for name in ("end-v5", "end-v3", "after-v5", "after-v3")}
    )
    assert (lost, duplicated, sorted(unexpected)) == (0, 0, []), [
        (t, collector.got[t]) for t in sorted(unexpected)[:5]
    ]

    m0, m1 = before["mqtt"], middle["mqtt"]
    assert m1.get("dropped", 0) - m0.get("dropped", 0) == dropped
    assert m1.get("disconnects", 0) == m0.get("disconnects", 0) == 0
    assert after["requests_served"] - before["requests_served"] == 2  # only the normal ones
    bad = middle["errors"].get("bad_request", 0) - before["errors"].get("bad_request", 0)
    assert bad == len(expected)
    assert_healthy(fuzz_daemon)

    modes = collections.Counter(p.mode for p in plans)
    kinds = collections.Counter(p.kind for p in plans)
    record(
        "fuzz: malformed payloads over MQTT",
        category="fuzz",
        load=f"{len(plans)} messages from a v5 and a v3.1.1 client, up to {MQTT_WINDOW} "
        "awaiting replies at once",
        faults="malformed input",
        inputs=", ".join(f"{kind} ({n})" for kind, n in sorted(kinds.items())),
        accepted=len(expected),
        answered=answered,
        lost=lost,
        duplicated=duplicated,
        figures={
            "messages_sent": len(plans),
            "with_a_reply_address": len(expected),
            "without_a_reply_address_dropped_and_counted": dropped,
            "by_addressing": dict(sorted(modes.items())),
            "qos0_messages": sum(p.qos == 0 for p in plans),
            "bytes_sent": sum(len(p.payload) for p in plans),
            "largest_payload_bytes": max(len(p.payload) for p in plans),
            "broker_max_packet_size": BROKER_MAX_PACKET,
            "daemon_max_payload_bytes": LINE_LIMIT,
            "model_runs_caused": after["requests_served"] - before["requests_served"] - 2,
            "daemon_disconnects": m1.get("disconnects", 0),
            "rss_mb_before": before["rss_mb"],
            "rss_mb_after": after["rss_mb"],
            "seconds_to_send_and_answer": round(elapsed, 1),
        },
    )


# --- hostile reply topics -----------------------------------------------------------------------

# name: (v5?, Response Topic, reply_to), each "bad" (the hostile topic), "good" or None (absent)
HOSTILE_MODES = {
    "v3.1.1, bad reply_to": (False, None, "bad"),
    "v5, bad reply_to": (True, None, "bad"),
    "v5, good response topic and a bad reply_to": (True, "good", "bad"),
    "v5, bad response topic and a good reply_to": (True, "bad", "good"),
    "v5, bad response topic": (True, "bad", None),
    "v5, bad response topic and a bad reply_to": (True, "bad", "bad"),
}
VALID_MODES = {
    "v5, response topic": (True, "good", None),
    "v5, reply_to": (True, None, "good"),
    "v3.1.1, reply_to": (False, None, "good"),
}
MODEL_WINDOW = 3  # valid requests at the model at once: well inside the engine's queue


def hostile_reply_topics(run: str, tag: str) -> list[tuple[str, Any]]:
    """(kind, value) of reply topics the daemon must never publish to. Those under `run` or
    `$<tag>` would reach the test's sniffer if the daemon published there."""
    out: list[tuple[str, Any]] = [
        ("control character", f"{run}/c{cp:x}/{chr(cp)}x")
        for cp in [*range(0x20), 0x7F, 0x80, 0x85, 0x9F]
    ]
    out += [
        ("lone surrogate", f"{run}/s{n}/{s}") for n, s in enumerate(["\ud800", "\udfff", "\udc80x"])
    ]
    out += [
        ("noncharacter", f"{run}/n{n}/{c}")
        for n, c in enumerate(["\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe", "\U0010ffff"])
    ]
    out += [("`$` topic", t) for t in [f"${tag}/x", f"$SYS/{run}/x", f"$share/g/{run}/x", "$"]]
    out += [
        ("wildcard", t)
        for t in ["+", "#", f"{run}/+/x", f"{run}/#", f"{run}/a+b", f"{run}/a#", "+/#"]
    ]
    out += [("empty", "")]
    out += [
        ("too long", f"{run}/" + "x" * (MAX_REPLY_TOPIC - len(run))),  # 513 bytes
        ("too long", f"{run}/" + "é" * 300),
        ("too long", f"{run}/" + "x" * 65000),  # 64 KiB, within the payload limit
    ]
    out += [("not a string", v) for v in [5, None, [], {}, True, [f"{run}/x"], {"topic": run}]]
    return out


def valid_edge_topics(run: str, n: int) -> list[str]:
    """Reply topics that look odd but are valid: the daemon answers on them."""
    stem = f"{run}/{n}"
    return [
        f"{stem}/é€😀", f"{stem}/\ufeff", f"{stem}/\U0010fffd", f"{stem}/a b", f"{stem}//x",
        f"{stem}/\u00a0\u2028", stem + "/" + "x" * (MAX_REPLY_TOPIC - len(stem) - 1),  # 512 bytes
    ]  # fmt: skip


def forwarded_by_mosquitto(topic: Any) -> bool:
    """Whether a v5 Response Topic reaches subscribers: mosquitto disconnects a publisher whose
    Response Topic holds a control character or noncharacter, and paho cannot encode a lone
    surrogate, so only the other bad topics can be tried as Response Topics."""
    if not isinstance(topic, str):
        return False
    try:
        topic.encode()
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xFDD0 <= ord(c) <= 0xFDEF
                   or ord(c) & 0xFFFE == 0xFFFE for c in topic)  # fmt: skip


class HostilePlan:
    """One message of the hostile-topic run: what is published, where its one answer goes."""

    def __init__(self, n: int, mode: str, kind: str, bad: Any, run: str, rng: random.Random,
                 good_topic: Optional[str] = None) -> None:  # fmt: skip
        self.n, self.mode, self.kind, self.bad = n, mode, kind, bad
        self.v5, rt, reply_to = {**HOSTILE_MODES, **VALID_MODES}[mode]
        good = good_topic or f"{run}/{n}"
        self.response_topic = {"good": good, "bad": bad, None: None}[rt]
        # A valid request: answered by the model if its bad reply topic were taken.
        self.model = mode in VALID_MODES or rng.random() < 0.5
        obj: dict[str, Any] = (
            {"id": f"r{n}", "prompt": "Say OK.", "max_tokens": 1, "stream": rng.random() < 0.5}
            if self.model
            else {"op": "status"}
        )
        if reply_to is not None:
            obj["reply_to"] = {"good": good, "bad": bad}[reply_to]
        self.payload = json.dumps(obj).encode()  # lone surrogates go escaped: valid JSON
        self.correlation = b"c%d" % n if self.v5 and rng.random() < 0.7 else None
        self.qos = 0 if rng.random() < 0.1 else 1
        topics, ids = mqtt_expectation(self.payload, self.response_topic, self.correlation)
        assert len(topics) == 1 and len(ids) == 1
        self.reply_topic, self.expected_id = topics.pop(), ids.pop()
        assert (self.reply_topic is None) == (mode not in VALID_MODES and "good" not in mode)
        # Which of its reply addresses the error names.
        self.blamed = "the Response Topic" if rt == "bad" and reply_to != "bad" else "`reply_to`"


def hostile_plans(run: str, tag: str, rng: random.Random) -> list[HostilePlan]:
    plans: list[HostilePlan] = []
    for kind, bad in hostile_reply_topics(run, tag):
        for mode, (_v5, rt, _reply_to) in HOSTILE_MODES.items():
            if rt == "bad" and not forwarded_by_mosquitto(bad):
                continue
            plans.append(HostilePlan(len(plans), mode, kind, bad, run, rng))
    for i in range(18):  # valid requests, every third on an odd but valid topic
        n = len(plans)
        mode = list(VALID_MODES)[i % len(VALID_MODES)]
        good = rng.choice(valid_edge_topics(run, n)) if i % 3 == 2 else None
        plans.append(HostilePlan(n, mode, "valid", None, run, rng, good))
    for p in plans:
        assert publish_packet_size(ASK, p.payload, p.response_topic, p.correlation, p.v5) <= (
            BROKER_MAX_PACKET
        )
    rng.shuffle(plans)
    return plans


def daemon_lines(broker: Broker, offset: int, client_id: str) -> list[str]:
    return [line for line in broker.log()[offset:].splitlines() if client_id in line]


def test_hostile_reply_topics_are_refused_and_the_link_stays_up(
    fuzz_broker: Broker, fuzz_daemon: Daemon
) -> None:
    """Every hostile topic in every place (reply_to from v3.1.1 and v5, Response Topic, both),
    carrying valid requests and ops, among valid requests: a message with a valid reply address
    gets exactly one answer there (an error naming the bad address, or the model's answer for
    the valid ones), nothing is published anywhere else (a sniffer subscribed to `#` and to a
    `$` topic checks), the model runs only for the valid requests and the daemon's link never
    drops. More dropped QoS 1 messages than mosquitto keeps in flight for a client (20) show
    that each was acknowledged: else the broker would stop delivering to the daemon."""
    tag = f"fz{uuid.uuid4().hex[:6]}"
    run = f"fuzz/hostile-{tag}"
    plans = hostile_plans(run, tag, random.Random(SEED))
    expected = {p.reply_topic: p for p in plans if p.reply_topic is not None}
    assert len(expected) == sum(p.reply_topic is not None for p in plans)  # one topic each
    dropped = [p for p in plans if p.reply_topic is None]
    assert sum(p.qos for p in dropped) > 20
    valid = [p for p in plans if p.kind == "valid"]
    model_runs = sum(p.model for p in valid)
    sentinels = {f"{run}/end-v5", f"{run}/end-v3"}

    collector = Collector(fuzz_broker.port, run)
    sniffer = Collector(fuzz_broker.port, run, filters=["#", f"${tag}/#"])
    v5, v3 = publisher(fuzz_broker.port, v5=True), publisher(fuzz_broker.port, v5=False)
    client_id = f"edgeagent-{NODE}"
    log_offset = len(fuzz_broker.log())
    before_log = fuzz_daemon.log()
    before = status(fuzz_daemon)
    t0 = time.monotonic()

    def finals(topic: str) -> list[dict[str, Any]]:
        events = [json.loads(payload) for payload, _ in collector.got.get(topic, [])]
        return [e for e in events if e["event"] in ("done", "error", "status")]

    try:
        started: list[HostilePlan] = []
        for p in plans:
            if p.model and p.reply_topic is not None:
                started.append(p)
                wait_until(
                    lambda: sum(not finals(str(s.reply_topic)) for s in started) <= MODEL_WINDOW,
                    "the model to catch up", timeout=120,
                )  # fmt: skip
            props = v5_properties(p.response_topic, p.correlation) if p.v5 else None
            (v5 if p.v5 else v3).publish(ASK, p.payload, p.qos, False, props)
        wait_until(lambda: all(finals(t) for t in expected), "every answer", timeout=120)
        after = end_of_run(v5, v3, collector, run, fuzz_daemon, before, len(plans))
        elapsed = time.monotonic() - t0
    finally:
        for client in (v5, v3):
            client.disconnect()
            client.loop_stop()
        collector.close()
        sniffer.close()

    answered = lost = duplicated = 0
    for topic, p in expected.items():
        got = finals(topic)
        lost += not got
        duplicated += max(0, len(got) - 1)
        if not got:
            continue
        event = got[0]
        assert collector.got[topic][-1][1] == p.correlation, (p.mode, p.kind)
        if p.kind == "valid":
            assert event["event"] == ("done" if p.model else "status"), event
            if p.model:
                assert event["id"] == f"r{p.n}" and event["text"], event
        else:
            check_error(event, {p.expected_id})
            assert event["message"].startswith(p.blamed), (p.mode, event)
        answered += 1
    assert (lost, duplicated) == (0, 0)

    # Nothing went anywhere else: the sniffer saw only the requests, the daemon's own topics,
    # the expected answers and the sentinels'.
    ours = set(expected) | sentinels | {ASK}
    elsewhere = sorted(t for t in sniffer.got if t not in ours and not t.startswith("edgeagent/"))
    assert elsewhere == [], elsewhere[:5]
    assert not [t for t in collector.got if t not in set(expected) | sentinels]

    m0, m1 = before["mqtt"], after["mqtt"]
    hostile = len(plans) - len(valid)
    assert m1.get("disconnects", 0) == m0.get("disconnects", 0) == 0
    assert m1.get("bad_reply_topic", 0) - m0.get("bad_reply_topic", 0) == hostile
    assert m1.get("dropped", 0) - m0.get("dropped", 0) == len(dropped)
    assert m1.get("inbound_errors", 0) == m1.get("replies_bad_topic", 0) == 0
    assert after["requests_served"] - before["requests_served"] == model_runs
    bad = after["errors"].get("bad_request", 0) - before["errors"].get("bad_request", 0)
    assert bad == hostile - len(dropped)
    # The broker never had to cut the daemon off, nor the daemon leave.
    assert not [
        line for line in daemon_lines(fuzz_broker, log_offset, client_id)
        if "disconnect" in line or "Malformed" in line or "closed" in line
    ]  # fmt: skip
    # Each drop is logged once, saying why, never quoting what the client sent.
    log = fuzz_daemon.log()
    drop_line = f"dropping a request on {ASK} with no way to reply: "
    assert log.count(drop_line) - before_log.count(drop_line) == len(dropped)
    assert drop_line + "`reply_to` holds U+0001 (a control character or noncharacter)" in log
    assert drop_line + "the Response Topic starts with `$`" in log
    for p in plans:
        if p.kind != "valid" and isinstance(p.bad, str) and p.bad.startswith(run):
            assert p.bad[: len(run) + 3] not in log, p.bad[:40]
    assert_healthy(fuzz_daemon)

    modes = collections.Counter(p.mode for p in plans)
    kinds = collections.Counter(p.kind for p in plans)
    record(
        "mqtt: hostile reply topics",
        category="security",
        load=f"{len(plans)} messages from a v5 and a v3.1.1 client: {hostile} with a bad reply "
        f"topic, {len(valid)} valid requests among them",
        faults="reply topics a broker refuses or the daemon must not publish to, in reply_to "
        "and in the v5 Response Topic",
        inputs=", ".join(f"{kind} ({n})" for kind, n in sorted(kinds.items())),
        accepted=len(expected),
        answered=answered,
        lost=lost,
        duplicated=duplicated,
        figures={
            "messages_sent": len(plans),
            "with_a_bad_reply_topic": hostile,
            "refused_on_the_other_reply_address": hostile - len(dropped),
            "without_a_valid_reply_address_dropped_and_counted": len(dropped),
            "valid_requests_answered": len(valid),
            "by_addressing": dict(sorted(modes.items())),
            "published_to_a_bad_topic": len(elsewhere),
            "model_runs_caused_by_bad_topics": after["requests_served"]
            - before["requests_served"]
            - model_runs,
            "daemon_disconnects": m1.get("disconnects", 0) - m0.get("disconnects", 0),
            "max_reply_topic_bytes": MAX_REPLY_TOPIC,
            "seconds_to_send_and_answer": round(elapsed, 1),
        },
    )


# --- the Maximum Packet Size the daemon asks for --------------------------------------------------

SMALL_NODE = "fuzz-small"
SMALL_ASK = f"edgeagent/{SMALL_NODE}/ask"
SMALL_PAYLOAD_LIMIT = 4096
SMALL_REDELIVERY_MB = 1


@pytest.fixture(scope="module")
def unlimited_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker with no max_packet_size of its own: only the daemon's limit applies."""
    b = Broker(tmp_path_factory.mktemp("unlimited-broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def small_daemon(unlimited_broker: Broker, daemon_factory: Callable[..., Daemon]) -> Daemon:
    extra = (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {unlimited_broker.port}\n'
        f"reconnect_min_s = 1\nreconnect_max_s = 2\nmax_payload_bytes = {SMALL_PAYLOAD_LIMIT}\n"
        f"redelivery_mb = {SMALL_REDELIVERY_MB}\n"
    )
    d = daemon_factory(node_id=SMALL_NODE, extra=extra)
    r = Requester(unlimited_broker.port)
    try:
        r.wait_online(f"edgeagent/{SMALL_NODE}/status")
    finally:
        r.close()
    return d


def payload_for_packet(size: int, response_topic: str, correlation: bytes) -> bytes:
    """A payload making a QoS 1 PUBLISH to SMALL_ASK exactly `size` bytes."""
    n = size - publish_packet_size(SMALL_ASK, b"", response_topic, correlation)
    while publish_packet_size(SMALL_ASK, b"x" * n, response_topic, correlation) > size:
        n -= 1
    payload = b"x" * n
    assert publish_packet_size(SMALL_ASK, payload, response_topic, correlation) == size
    return payload


def test_a_message_over_the_packet_size_asked_for_never_reaches_the_daemon(
    unlimited_broker: Broker, small_daemon: Daemon
) -> None:
    """The daemon (MQTT v5) asks the broker for a Maximum Packet Size that fits its largest
    request (max_payload_bytes, a Response Topic at max_reply_topic_bytes, 64 KiB of
    Correlation Data) with room to spare. A message of exactly that size is delivered and
    refused as too large a payload; larger ones, which the broker itself would take, are
    dropped by the broker (its log says so) and never read by the daemon, which stays
    connected and then answers a normal request."""
    asked = status(small_daemon)["mqtt"]["max_packet_size_asked"]
    largest = publish_packet_size(SMALL_ASK, b"x" * SMALL_PAYLOAD_LIMIT, "r" * MAX_REPLY_TOPIC,
                                  b"c" * 65535)  # fmt: skip
    assert largest <= asked <= largest + 8192, (largest, asked)

    run = f"fuzz/max-{uuid.uuid4().hex[:6]}"
    collector = Collector(unlimited_broker.port, run)
    pub = publisher(unlimited_broker.port, v5=True)
    log_offset = len(unlimited_broker.log())
    before = status(small_daemon)["mqtt"]
    over = {"over": asked + 64, "far-over": 1 << 20}
    try:
        correlation = b"\xc7" * 65535
        at_limit = payload_for_packet(asked, f"{run}/fits", correlation)
        pub.publish(SMALL_ASK, at_limit, 1, False, v5_properties(f"{run}/fits", correlation))
        for name, size in over.items():
            payload = payload_for_packet(size, f"{run}/{name}", b"o")
            for qos in (0, 1):
                props = v5_properties(f"{run}/{name}", b"o")
                pub.publish(SMALL_ASK, payload, qos, False, props).wait_for_publish(10)
        event = collector.wait_for(f"{run}/fits")
        assert event["event"] == "error" and event["code"] == protocol.BAD_REQUEST, event
        assert f"over the {SMALL_PAYLOAD_LIMIT}-byte limit" in event["message"], event
        assert collector.got[f"{run}/fits"][0][1] == correlation
        # A normal request after them is answered: they were not queued for the daemon.
        request = {"id": "after-max", "prompt": "Say OK.", "max_tokens": 2, "stream": False}
        pub.publish(SMALL_ASK, json.dumps(request), 1, False, v5_properties(f"{run}/after", b"a"))
        done = collector.wait_for(f"{run}/after")
        assert done["event"] == "done" and done["id"] == "after-max" and done["text"], done
        after = status(small_daemon)["mqtt"]
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.close()

    assert not [t for t in collector.got if t.split("/")[-1] in over]
    assert after["received"] - before.get("received", 0) == 2  # the one at the limit, the normal
    assert after.get("disconnects", 0) == before.get("disconnects", 0) == 0
    drops = [
        line for line in unlimited_broker.log()[log_offset:].splitlines()
        if f"Dropping too large outgoing PUBLISH for edgeagent-{SMALL_NODE}" in line
    ]  # fmt: skip
    assert len(drops) == 2 * len(over), drops
    assert_healthy(small_daemon)

    record(
        "mqtt: messages over the Maximum Packet Size the daemon asks for",
        category="security",
        load=f"{1 + 2 * len(over)} messages of up to 1 MiB, then a normal request",
        faults="messages larger than any request the daemon reads, which the broker would take",
        inputs=f"max_payload_bytes {SMALL_PAYLOAD_LIMIT}; packets of {asked} bytes (the size "
        f"asked for), {over['over']} and {over['far-over']} bytes at QoS 0 and 1",
        accepted=2,
        answered=2,
        lost=0,
        duplicated=0,
        figures={
            "max_packet_size_asked": asked,
            "largest_request_packet": largest,
            "messages_over_it": 2 * len(over),
            "dropped_by_the_broker": len(drops),
            "read_by_the_daemon": after["received"] - before.get("received", 0) - 2,
            "daemon_disconnects": after.get("disconnects", 0),
        },
    )


def test_correlation_data_cannot_grow_the_redelivery_map_past_redelivery_mb(
    unlimited_broker: Broker, small_daemon: Daemon
) -> None:
    """The map that answers a redelivered request once keeps each request's reply topic and
    Correlation Data. Requests carrying 64 KiB of Correlation Data each, four times what
    redelivery_mb (1) holds: each is answered once, and the map stays within its bytes,
    the oldest forgotten first and counted."""
    count = 64
    run = f"fuzz/redelivery-{uuid.uuid4().hex[:6]}"
    collector = Collector(unlimited_broker.port, run)
    pub = publisher(unlimited_broker.port, v5=True)
    before = status(small_daemon)["mqtt"]
    limit = SMALL_REDELIVERY_MB << 20
    rng = random.Random(SEED)
    try:
        correlations = [rng.randbytes(65535) for _ in range(count)]
        for n, corr in enumerate(correlations):
            pub.publish(SMALL_ASK, b'{"op": "status"}', 1, False,
                        v5_properties(f"{run}/{n}", corr))  # fmt: skip
        wait_until(lambda: len(collector.got) == count, "every answer")
        after = status(small_daemon)["mqtt"]
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.close()

    for n, corr in enumerate(correlations):
        replies = collector.got[f"{run}/{n}"]
        assert len(replies) == 1 and replies[0][1] == corr
        assert json.loads(replies[0][0])["event"] == "status"
    assert after["redelivery_bytes"] <= limit
    held = after["redelivery_entries"]
    # Each entry holds more than its 64 KiB: at most 16 fit in 1 MiB, and no fewer are kept
    # than fit (the entry's few hundred bytes of key and bookkeeping aside).
    assert limit // (65535 + 2048) <= held <= limit // 65535, held
    evicted = after.get("redelivery_evicted", 0) - before.get("redelivery_evicted", 0)
    assert evicted == count + before["redelivery_entries"] - held
    assert after.get("disconnects", 0) == 0
    assert_healthy(small_daemon)

    record(
        "mqtt: Correlation Data filling the redelivery map",
        category="security",
        load=f"{count} status ops with 64 KiB of Correlation Data each, on their own topics",
        faults="requests whose reply address (kept to answer a redelivery once) is as large "
        "as MQTT allows",
        inputs=f"redelivery_mb {SMALL_REDELIVERY_MB}",
        accepted=count,
        answered=count,
        lost=0,
        duplicated=0,
        figures={
            "correlation_bytes_sent": count * 65535,
            "redelivery_bytes_held": after["redelivery_bytes"],
            "redelivery_entries_held": held,
            "entries_forgotten_oldest_first": evicted,
        },
    )
