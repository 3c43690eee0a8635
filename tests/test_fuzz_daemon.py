"""Malformed input against a real daemon, a real mosquitto and the real model.

Over 10,000 malformed messages on the Unix socket (several connections, pipelined) and as many
over MQTT (v5 with and without Response Topic and Correlation Data, v3.1.1 with and without
`reply_to`, payloads up to the broker's maximum packet size): every message that has a reply
address gets exactly one `bad_request`, carrying its id when the id was readable; the daemon
stays up and connected to the broker, never runs the model for them, and then answers a normal
request. The corpus is generated from a seed (tests/fuzz_corpus.py).
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
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
    """A real MQTT v5 client subscribed to every reply topic of a run, keeping each message."""

    def __init__(self, port: int, prefix: str) -> None:
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
        self.client.subscribe(f"{prefix}/#", 1)
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


def valid_topic(topic: object) -> bool:
    return (
        isinstance(topic, str) and 0 < len(topic.encode()) <= 65535
        and not any(c in topic for c in "+#\0")
    )  # fmt: skip


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
    carry, from docs/mqtt.md."""
    topic = response_topic if valid_topic(response_topic) else None
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
    fuzz_broker: Broker, fuzz_daemon: Daemon
) -> None:
    """A Response Topic and Correlation Data sized so that the request fits the broker's
    maximum packet size but the error about it may not: exactly at the maximum it is sent;
    over it (by one byte, which the specification forbids and mosquitto happens to let
    through, or by more, for which mosquitto disconnects the sender) it is dropped."""
    run = f"fuzz/big-{uuid.uuid4().hex[:6]}"
    collector = Collector(fuzz_broker.port, run)
    pub = publisher(fuzz_broker.port, v5=True)
    before = status(fuzz_daemon)["mqtt"]
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
            assert publish_packet_size(ASK, b"{", topic, correlation) <= BROKER_MAX_PACKET
            props = v5_properties(topic, correlation)
            pub.publish(ASK, b"{", 1, False, props).wait_for_publish(10)
            if name == "fits":
                event = collector.wait_for(topic)
                assert event["event"] == "error" and event["code"] == protocol.BAD_REQUEST
                assert collector.got[topic][0][1] == correlation
        # The link is still up: a status op on a short topic is answered after the dropped one.
        pub.publish(ASK, b'{"op": "status"}', 1, False, v5_properties(f"{run}/s", b"s"))
        assert collector.wait_for(f"{run}/s")["event"] == "status"
        after = status(fuzz_daemon)["mqtt"]
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.close()
    assert not [t for t in collector.got if "over/" in t]
    assert after.get("replies_too_large", 0) == before.get("replies_too_large", 0) + 2
    assert after.get("disconnects", 0) == before.get("disconnects", 0) == 0
    assert "over the broker's maximum packet size of 131072" in fuzz_daemon.log()
    assert_healthy(fuzz_daemon)


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
INVALID_REPLY_TO = ["", "a/+/b", "#", "+", "fuzz/#", "t\u0000", 5, None, [], {}, True, "x" * 65536]


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
        # Status ops after everything, from both publishers: answered after any late reply.
        v5.publish(ASK, b'{"op": "status"}', 1, False, v5_properties(f"{run}/end-v5", None))
        v3.publish(ASK, json.dumps({"op": "status", "reply_to": f"{run}/end-v3"}), 1)
        collector.wait_for(f"{run}/end-v5")
        collector.wait_for(f"{run}/end-v3")
        elapsed = time.monotonic() - t0
        received = before["mqtt"].get("received", 0) + len(plans) + 2
        wait_until(
            lambda: status(fuzz_daemon)["mqtt"].get("received", 0) == received,
            "the daemon to count every message",
        )
        middle = status(fuzz_daemon)

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
