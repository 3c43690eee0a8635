"""Resource limits on the terminal socket: how many terminals are served at once, how long one may
stay silent, how much of its replies one may leave unread, and how a long line is put together.

All against one real daemon with small limits, over its real socket; no test needs more than a
few tokens of generation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any, Callable

import psutil
import pytest

from tests.conftest import Daemon, connect
from tests.reliability import record

MAX_CONNECTIONS = 3
IDLE_S = 2.0
MAX_UNSENT = 64 << 10  # the smallest the config allows
LINE_LIMIT = 1 << 20
LIMITS = f"""max_connections = {MAX_CONNECTIONS}
idle_timeout_s = {IDLE_S}
max_unsent_bytes = {MAX_UNSENT}
max_line_bytes = {LINE_LIMIT}
"""
STATUS_LINE = b'{"op":"status"}\n'
FLOOD_LINES = 100_000  # 1.6 MB of requests: far more than the kernel's socket buffers hold
# Before the limits, one 64 KiB read of status ops left about 4.5 MB of replies in the daemon.
RSS_GROWTH_BOUND = 2 << 20
WAIT_S = 15.0  # the most any one thing below is waited for


@pytest.fixture(scope="module")
def limited(daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    d = daemon_factory(extra=LIMITS)
    yield d
    d.stop()


def wait_for_log(daemon: Daemon, text: str, count: int) -> None:
    """Until the daemon's log holds `text` at least `count` times."""
    deadline = time.monotonic() + WAIT_S
    while daemon.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{daemon.log()}"
        time.sleep(0.05)


def wait_until_no_connections(daemon: Daemon) -> None:
    """Until the daemon has seen every earlier connection go (each test starts from none)."""
    wait_for_log(daemon, "terminal disconnected", daemon.log().count("terminal connected"))


def test_connections_over_the_limit_are_refused_busy_until_one_closes(limited: Daemon) -> None:
    wait_until_no_connections(limited)
    refusals = limited.log().count("refusing terminal")
    conns = [connect(limited.socket_path, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        for c in conns:
            assert c.op("status")["event"] == "status"
        with connect(limited.socket_path, timeout=10) as extra:
            busy = extra.read()
            assert busy == {"event": "error", "id": None, "code": "busy",
                            "message": busy["message"]}, busy  # fmt: skip
            assert f"{MAX_CONNECTIONS} terminals are connected" in busy["message"]
            with pytest.raises(EOFError):
                extra.read()
        # The held connections are still served after the refusal.
        assert conns[0].op("status")["event"] == "status"
        gone = limited.log().count("terminal disconnected")
        conns.pop().close()
        wait_for_log(limited, "terminal disconnected", gone + 1)
        with connect(limited.socket_path, timeout=10) as again:
            assert again.op("status")["event"] == "status"
    finally:
        for c in conns:
            c.close()
    assert limited.log().count("refusing terminal") == refusals + 1
    record(
        "socket: more terminals than max_connections",
        category="security",
        load=f"{MAX_CONNECTIONS} connections held, one more, then one closed and one more",
        faults="a connection over max_connections",
        inputs=f"max_connections = {MAX_CONNECTIONS}",
        accepted=MAX_CONNECTIONS + 1,
        answered=MAX_CONNECTIONS + 1,
        lost=0,
        duplicated=0,
        figures={"refused_with": busy["code"]},
    )


def test_a_silent_connection_is_closed_and_a_talking_one_is_not(limited: Daemon) -> None:
    wait_until_no_connections(limited)
    closed = limited.log().count("sent nothing for")
    with connect(limited.socket_path, timeout=10) as quiet, \
            connect(limited.socket_path, timeout=10) as talking:  # fmt: skip
        assert quiet.op("status")["event"] == "status"
        assert talking.op("status")["event"] == "status"
        quiet.sock.settimeout(IDLE_S / 4)
        deadline = time.monotonic() + IDLE_S + WAIT_S
        pings = 0
        while True:
            try:
                if quiet.sock.recv(65536) == b"":
                    break
                pytest.fail("the silent connection got a reply it did not ask for")
            except socket.timeout:
                pass
            assert time.monotonic() < deadline, "the silent connection was never closed"
            # Connected as long as `quiet` and never silent for long: it must stay.
            assert talking.op("status")["event"] == "status"
            pings += 1
        assert talking.op("status")["event"] == "status"
    assert limited.log().count("sent nothing for") == closed + 1
    record(
        "socket: silent connection",
        category="security",
        load=f"2 connections: one silent, one asking for status every {IDLE_S / 4:g} s",
        faults="a terminal that connects and says nothing",
        inputs=f"idle_timeout_s = {IDLE_S:g}",
        accepted=pings + 3,
        answered=pings + 3,
        lost=0,
        duplicated=0,
        figures={"talking_pings_while_quiet_open": pings},
    )


def test_a_request_in_flight_keeps_a_silent_connection_open(limited: Daemon) -> None:
    """The daemon is stopped (SIGSTOP) mid-generation for longer than idle_timeout_s: a stand-in
    for a long prompt on a slow box that does not depend on this box's speed."""
    assert limited.proc is not None
    wait_until_no_connections(limited)
    stopped_s = IDLE_S * 1.5
    with connect(limited.socket_path, timeout=WAIT_S) as c:
        c.send({"id": "slow", "prompt": "List twenty machine tools, one per line.",
                "max_tokens": 16})  # fmt: skip
        first = c.read()
        assert first["event"] == "token" and first["id"] == "slow", first
        os.kill(limited.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(stopped_s)
        finally:
            os.kill(limited.proc.pid, signal.SIGCONT)
        done = c.until_final("slow")[-1]
        assert done["event"] == "done" and done["text"], done
        # It was in flight all through the silence that would have closed an idle connection.
        assert done["timings"]["total_ms"] > stopped_s * 1000, done
        # Answered, the connection is idle like any other.
        with pytest.raises(EOFError):
            c.read()
    record(
        "socket: silent connection with a request in flight",
        category="security",
        load="1 request, its connection silent while it runs",
        faults=f"the daemon stopped {stopped_s:g} s mid-generation (SIGSTOP)",
        inputs=f"idle_timeout_s = {IDLE_S:g}",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"request_total_ms": done["timings"]["total_ms"]},
    )


def read_until_closed(sock: socket.socket) -> bytes:
    sock.setblocking(True)
    sock.settimeout(WAIT_S)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:  # the daemon closed with our requests still unread
        pass
    return data


def test_a_client_that_sends_and_never_reads_is_throttled_then_cut(limited: Daemon) -> None:
    assert limited.proc is not None
    wait_until_no_connections(limited)
    cut = limited.log().count("has not read its replies")
    daemon = psutil.Process(limited.proc.pid)
    payload = STATUS_LINE * FLOOD_LINES
    with connect(limited.socket_path, timeout=10) as other:
        assert other.op("status")["event"] == "status"
        rss_before = daemon.memory_info().rss
        peak = rss_before
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            flood.connect(limited.socket_path)
            flood.setblocking(False)
            sent, cut_while_sending = 0, False
            last_progress = time.monotonic()
            # Send until the daemon stops taking lines: no progress for a while.
            while sent < len(payload) and time.monotonic() - last_progress < IDLE_S / 2:
                try:
                    sent += flood.send(payload[sent : sent + 65536])
                    last_progress = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    cut_while_sending = True
                    break
                peak = max(peak, daemon.memory_info().rss)
            throttled = sent < len(payload)
            assert throttled or cut_while_sending, "the daemon read all 100,000 status ops"
            # The daemon holds little for the flood, and serves another terminal meanwhile.
            growth = peak - rss_before
            assert growth < RSS_GROWTH_BOUND, f"daemon RSS grew {growth / 1e6:.1f} MB"
            deadline = time.monotonic() + IDLE_S + WAIT_S
            while limited.log().count("has not read its replies") == cut:
                assert time.monotonic() < deadline, "the non-reading client was never cut off"
                assert other.op("status")["event"] == "status"
                peak = max(peak, daemon.memory_info().rss)
                time.sleep(0.1)
            received = read_until_closed(flood)
        finally:
            flood.close()
        assert other.op("status")["event"] == "status"
    # Cut off, its last reply may have been half written: only whole lines count.
    replies = [json.loads(line) for line in received.split(b"\n")[:-1]]
    assert replies and all(r["event"] == "status" for r in replies), replies[-1:]
    assert len(replies) < sent // len(STATUS_LINE)  # most of what it sent was never taken
    growth = peak - rss_before
    assert growth < RSS_GROWTH_BOUND, f"daemon RSS grew {growth / 1e6:.1f} MB before the cut"
    record(
        "socket: client sends status ops and never reads",
        category="security",
        load="1 client sending 100,000 status ops without reading, 1 client asking for status",
        faults="a terminal that never reads its replies",
        inputs=f"max_unsent_bytes = {MAX_UNSENT}, idle_timeout_s = {IDLE_S:g}",
        accepted=len(replies),
        answered=len(replies),
        lost=0,
        duplicated=0,
        figures={
            "bytes_sent_before_blocked": sent,
            "replies_before_cut": len(replies),
            "daemon_rss_growth_kb": growth >> 10,
        },
    )


def send_in_pieces(sock: socket.socket, data: bytes, size: int = 4096) -> None:
    for i in range(0, len(data), size):
        sock.sendall(data[i : i + size])


def request_line(rid: str, length: int) -> bytes:
    """A request for 2 tokens, padded with spaces to `length` bytes, and its newline."""
    request = json.dumps({"id": rid, "prompt": "Say OK.", "max_tokens": 2}).encode()
    return request + b" " * (length - len(request)) + b"\n"


def test_lines_near_max_line_bytes_arriving_in_small_reads(limited: Daemon) -> None:
    """Lines are put together from 4 KiB reads: one byte over the limit is refused and the next
    line served; exactly the limit is answered; short lines split anywhere are answered."""
    wait_until_no_connections(limited)
    ids = {"after-over", "at-limit", "a", "b"}
    with connect(limited.socket_path, timeout=60) as c:
        send_in_pieces(
            c.sock, request_line("over", LINE_LIMIT + 1) + request_line("after-over", 80)
        )
        refused = c.read()
        assert refused["event"] == "error" and refused["id"] is None, refused
        assert f"line longer than {LINE_LIMIT} bytes" in refused["message"]
        send_in_pieces(c.sock, request_line("at-limit", LINE_LIMIT))
        short = request_line("a", 80).replace(b"\n", b"\r\n") + b"\n" + request_line("b", 80)
        for piece in (short[:7], short[7:80], short[80:81], short[81:]):
            c.send_raw(piece)
        results = c.collect(ids)
    finals: dict[str, Any] = {rid: events[-1] for rid, events in results.items()}
    assert all(f["event"] == "done" and f["text"] for f in finals.values()), finals
    record(
        "socket: lines near max_line_bytes in 4 KiB pieces",
        category="security",
        load="1 connection, 5 lines",
        faults="a line 1 byte over max_line_bytes, sent in 4 KiB pieces",
        inputs=f"max_line_bytes = {LINE_LIMIT}; lines split at every size down to 1 byte",
        accepted=len(ids),
        answered=len(finals),
        lost=0,
        duplicated=0,
        figures={"refused": 1},
    )
