"""Malformed input against a real daemon, a real mosquitto and the real model: each message
with a reply address gets exactly one `bad_request`, and the daemon stays up and connected.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

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
