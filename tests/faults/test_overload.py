"""Overload: a burst of 1,000 requests over the socket and MQTT at once, against a small queue."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from edgeagent.mqtt_client import publish_properties
from tests.conftest import Daemon, connect
from tests.faults.conftest import (
    FINAL_EVENTS,
    RecordingRequester,
    finals_per_id,
    percentile,
    tally,
    vm_rss_mb,
)
from tests.mqtt_helpers import Broker
from tests.reliability import record
from tests.test_mqtt import mqtt_section
from tests.test_systemd import NotifySocket

QUEUE = 4
SOCKET_CLIENTS = 5
MQTT_CLIENTS = 5
PER_CLIENT = 100  # 10 clients x 100 = 1,000 requests
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: the daemon pings every second
ASK = "edgeagent/test-node/ask"


def request(rid: str) -> dict[str, Any]:
    return {"id": rid, "prompt": f"Say the number {rid[-3:]}.", "max_tokens": 3}


class SocketClient(threading.Thread):
    """One terminal that writes its whole share of the burst at once and reads every reply."""

    def __init__(self, path: str, ids: list[str], start: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.path, self.ids, self.barrier = path, ids, start
        self.sent_at = 0.0
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.path, timeout=120) as c:
                lines = b"".join(json.dumps(request(rid)).encode() + b"\n" for rid in self.ids)
                self.barrier.wait()
                self.sent_at = time.monotonic()
                c.send_raw(lines)
                open_ids = set(self.ids)
                deadline = time.monotonic() + 240
                while open_ids and time.monotonic() < deadline:
                    event = c.read()
                    self.arrivals.append((time.monotonic(), event))
                    if event.get("event") in FINAL_EVENTS:
                        open_ids.discard(event.get("id"))
                # Anything answered twice would come right behind.
                c.sock.settimeout(1.0)
                try:
                    while True:
                        self.arrivals.append((time.monotonic(), c.read()))
                except (TimeoutError, OSError):
                    pass
        except BaseException as exc:
            self.error = exc


def publish_burst(
    r: RecordingRequester, ids: list[str], sent_at: dict[str, float], start: threading.Barrier
) -> None:
    """Publish a client's whole share at once (paho queues what the broker cannot take yet)."""
    props = publish_properties(response_topic=r.reply_topic)
    start.wait()
    infos = []
    for rid in ids:
        sent_at[rid] = time.monotonic()
        infos.append(r.client.publish(ASK, json.dumps(request(rid)), 1, False, props))
    for info in infos:
        info.wait_for_publish(60)


def test_burst_of_1000_requests_holds_the_queue_bound(
    tmp_path: Path, daemon_factory: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    stop_pump = threading.Event()

    def pump_notify() -> None:  # read notifications all along, as systemd does
        while not stop_pump.is_set():
            notify.pump(0.1)

    pump = threading.Thread(target=pump_notify)
    pump.start()
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker").start()
    requesters: list[RecordingRequester] = []
    try:
        d = daemon_factory(queue_size=QUEUE, extra=mqtt_section(broker, client_id="overload"))
        assert d.proc is not None
        pid = d.proc.pid
        requesters = [RecordingRequester(broker.port) for _ in range(MQTT_CLIENTS)]
        requesters[0].wait_online()
        with connect(d.socket_path) as c:  # warm: the KV cache and buffers exist before we measure
            c.send(request("warm-000"))
            assert c.until_final("warm-000")[-1]["event"] == "done"
        rss_before = vm_rss_mb(pid)

        socket_ids = [[f"s{c}-{i:03d}" for i in range(PER_CLIENT)] for c in range(SOCKET_CLIENTS)]
        mqtt_ids = [[f"m{c}-{i:03d}" for i in range(PER_CLIENT)] for c in range(MQTT_CLIENTS)]
        barrier = threading.Barrier(SOCKET_CLIENTS + MQTT_CLIENTS + 1)
        sockets = [SocketClient(d.socket_path, ids, barrier) for ids in socket_ids]
        mqtt_sent: dict[str, float] = {}
        publishers = [
            threading.Thread(target=publish_burst, args=(r, ids, mqtt_sent, barrier))
            for r, ids in zip(requesters, mqtt_ids)
        ]
        depths: list[tuple[int, int]] = []
        stop = threading.Event()

        def poll_status() -> None:
            with connect(d.socket_path) as c:
                while not stop.is_set():
                    status = c.op("status")
                    depths.append((status["queue_depth"], status["in_flight"]))
                    time.sleep(0.02)

        with connect(d.socket_path) as c:
            slots = c.op("status")["slots"]["parallel"]  # requests decoded at once

        poller = threading.Thread(target=poll_status)
        for t in [*sockets, *publishers, poller]:
            t.start()
        barrier.wait()
        t_start = time.monotonic()
        all_mqtt = [rid for ids in mqtt_ids for rid in ids]
        for s in sockets:
            s.join(300)
        for t in publishers:
            t.join(60)
        for r, ids in zip(requesters, mqtt_ids):
            r.wait_finals(ids, timeout=240)
        t_end = time.monotonic()
        time.sleep(1.0)  # late duplicates would arrive now
        stop.set()
        poller.join(10)
        rss_after = vm_rss_mb(pid)

        with connect(d.socket_path) as c:  # and it still serves a normal request
            c.send({"id": "after", "prompt": "What does CNC stand for?", "max_tokens": 12})
            after = c.until_final("after")[-1]
    finally:
        stop_pump.set()
        pump.join(10)
        for r in requesters:
            r.close()
        broker.stop()

    for s in sockets:
        assert s.error is None, s.error
    socket_events = [e for s in sockets for _, e in s.arrivals]
    mqtt_events = [e for r in requesters for e in r.events()]
    all_ids = [rid for ids in socket_ids + mqtt_ids for rid in ids]
    finals = finals_per_id(socket_events + mqtt_events)
    counts = tally(all_ids, finals)
    stray = [e for e in socket_events + mqtt_events if e.get("id") not in set(all_ids)]
    outcomes = [f[0] for rid in all_ids for f in [finals.get(rid, [])] if f]
    done = [e for e in outcomes if e["event"] == "done"]
    busy = [e for e in outcomes if e["event"] == "error" and e["code"] == "busy"]
    other = [e for e in outcomes if e not in done and e not in busy]

    # Every request got exactly one final event, and it carries the request's id.
    assert counts == {"answered": 1000, "lost": 0, "duplicated": 0}, counts
    assert not stray, stray[:5]
    assert not other, other[:5]
    assert done and busy, (len(done), len(busy))  # the bound was reached and work went on
    assert all(e["usage"]["completion_tokens"] >= 1 for e in done)
    assert all("queue full (4 waiting)" in e["message"] for e in busy)
    # The queue bound held all along: never more than QUEUE waiting, nor more accepted than
    # the queue and the decoding slots hold.
    assert depths and max(q for q, _ in depths) <= QUEUE, max(depths)
    assert max(n for _, n in depths) <= QUEUE + slots
    # Memory stayed flat.
    assert rss_after - rss_before < 50, (rss_before, rss_after)
    # systemd's watchdog was fed all along: no gap longer than WatchdogSec.
    pings = [t for t in notify.times("WATCHDOG=1") if t_start <= t <= t_end]
    gaps = [b - a for a, b in zip([t_start, *pings], [*pings, t_end])]
    assert pings and max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert after["event"] == "done" and "numerical control" in after["text"].lower(), after
    assert "Traceback" not in d.log()

    def busy_latencies(
        events: list[tuple[float, dict[str, Any]]], sent: Callable[[str], float]
    ) -> list[float]:
        return [
            (t - sent(e["id"])) * 1000
            for t, e in events
            if e.get("event") == "error" and e.get("code") == "busy"
        ]

    socket_busy_ms = [
        ms for s in sockets for ms in busy_latencies(s.arrivals, lambda _id, s=s: s.sent_at)
    ]
    mqtt_busy_ms = [
        ms
        for r in requesters
        for ms in busy_latencies([(t, e) for t, e, _ in r.arrivals], mqtt_sent.__getitem__)
    ]
    record(
        "overload: 1,000-request burst",
        category="load",
        load=f"1,000 requests at once: {SOCKET_CLIENTS} terminals x {PER_CLIENT} pipelined on "
        f"the socket, {MQTT_CLIENTS} MQTT v5 clients x {PER_CLIENT}; max_tokens 3; "
        f"[engine] queue_size {QUEUE}, parallel slots {slots}",
        faults="overload (queue full most of the time)",
        inputs="valid requests",
        accepted=len(done),
        answered=len(done),  # each accepted one got its done: lost and duplicated are 0
        refused=len(busy),
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        figures={
            "requests": len(all_ids),
            "done": len(done),
            "busy": len(busy),
            "done_socket": sum(1 for e in done if e["id"].startswith("s")),
            "done_mqtt": sum(1 for e in done if e["id"].startswith("m")),
            "burst_s": round(t_end - t_start, 2),
            "busy_ms_p50_socket": percentile(socket_busy_ms, 50),
            "busy_ms_p99_socket": percentile(socket_busy_ms, 99),
            "busy_ms_p50_mqtt": percentile(mqtt_busy_ms, 50),
            "busy_ms_p99_mqtt": percentile(mqtt_busy_ms, 99),
            "parallel_slots": slots,
            "max_queue_depth_seen": max(q for q, _ in depths),
            "max_in_flight_seen": max(n for _, n in depths),
            "status_samples": len(depths),
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1),
            "rss_mb_growth": round(rss_after - rss_before, 1),
            "watchdog_pings_during_burst": len(pings),
            "watchdog_max_gap_s": round(max(gaps), 2),
            "watchdog_sec": WATCHDOG_USEC / 1e6,
            "mqtt_requests_published": len(all_mqtt),
        },
    )
