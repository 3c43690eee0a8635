"""Malformed input against a real daemon, a real mosquitto and the real model: each message
with a reply address gets exactly one `bad_request`, and the daemon stays up and connected.
"""

from __future__ import annotations

import collections
import json
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
from tests.conftest import Daemon, connect
from tests.mqtt_helpers import Broker

LINE_LIMIT = 64 * 1024  # [socket] max_line_bytes and [mqtt] max_payload_bytes
BROKER_MAX_PACKET = 128 * 1024  # mosquitto's max_packet_size (announced to v5 clients)
NODE = "fuzz-node"
ASK = f"edgeagent/{NODE}/ask"


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
    wait_until(lambda: status(d)["mqtt"]["connected"], "the daemon to connect to the broker")
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
