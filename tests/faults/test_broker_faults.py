"""Broker faults: the local broker killed mid-stream, the cloud broker flapping, the cloud link
partitioned, while requests and escalations flow. Nothing accepted may be lost or answered twice.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

from tests.conftest import Daemon, connect
from tests.faults.conftest import (
    ONE_THREAD,
    EventCollector,
    RecordingRequester,
    TcpProxy,
    escalation_tally,
    finals_per_id,
    tally,
    wait_until,
)
from tests.mqtt_helpers import Broker
from tests.reliability import record
from tests.test_escalation import daemon_extra, stack, wait_link  # noqa: F401 (stack: fixture)
from tests.test_mqtt import mqtt_section

ASK = "edgeagent/test-node/ask"


def saved_now(broker: Broker) -> None:
    """Make mosquitto write its persistence file (SIGUSR1) and wait until it has."""
    db = broker.workdir / "mosquitto.db"
    before = db.stat().st_mtime_ns if db.exists() else 0
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: db.exists() and db.stat().st_mtime_ns > before, 10, 0.01)


def test_local_broker_kill_9_mid_stream(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    b = Broker(tmp_path).start()
    d = daemon_factory(extra=mqtt_section(b, client_id="bk-node") + ONE_THREAD)
    r = RecordingRequester(b.port, persistent=True)
    ids = [f"k{i}" for i in range(4)]
    try:
        r.wait_online()
        for rid in ids:
            r.publish(
                ASK,
                {"id": rid, "prompt": f"Describe machine tool number {rid[-1]}.", "max_tokens": 48},
                response_topic=r.reply_topic,
            )
        # Kill in the middle of k1's stream, far from any final event: the broker has saved
        # its state (as its autosave would) and dies with k1 generating, k2.. queued.
        assert wait_until(
            lambda: sum(1 for e in r.events() if e.get("id") == "k1") >= 3, 120, 0.01
        ), r.events()
        saved_now(b)
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        killed_after = len(r.events())
        time.sleep(1.0)
        b.start()  # same port, same persistence
        r.wait_finals(ids, timeout=240)
        time.sleep(3)  # a second answer would arrive now
    finally:
        r.close()
        d.stop()
        b.stop()
    events = r.events()
    finals = finals_per_id(events)
    counts = tally(ids, finals)
    assert counts == {"answered": 4, "lost": 0, "duplicated": 0}, (counts, finals)
    assert all(finals[rid][0]["event"] == "done" for rid in ids), finals
    assert "MQTT connection lost" in d.log()  # the fault did happen
    assert killed_after < len(events)
    record(
        "broker: local mosquitto kill -9 mid-stream",
        category="broker",
        load="4 MQTT v5 requests of 48 tokens from a persistent-session client",
        faults="local broker kill -9 while the 2nd request streams (state saved just before), "
        "restarted on the same port 1 s later",
        inputs="valid requests",
        accepted=len(ids),
        answered=counts["answered"],
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        figures={
            "finals_with_dup_flag": sum(
                1 for _, e, dup in r.arrivals if dup and e.get("event") in ("done", "error")
            ),
            "events_before_kill": killed_after,
            "events_total": len(events),
        },
    )


def escalate(conn_send: Callable[[dict[str, Any]], None], rid: str) -> None:
    conn_send(
        {"id": rid, "prompt": f"Name metal number {rid[1:]}.", "max_tokens": 8, "escalate": True}
    )


def collect_escalations(collector: EventCollector, ids: list[str]) -> dict[str, Any]:
    """Wait (bounded) until every request is answered and every escalation has its outcome."""

    def settled() -> bool:
        t = escalation_tally(ids, collector.events())
        return t["answered"] + t["duplicated"] == len(ids) and not t["waiting_for_cloud"]

    wait_until(settled, 180, 0.2)
    time.sleep(3)  # a second answer or follow-up would arrive now
    t = escalation_tally(ids, collector.events())
    t["lost"] += len(t["waiting_for_cloud"])
    return t


def test_cloud_broker_flapping_while_escalations_flow(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    cloud: Broker = stack["cloud"]
    d = daemon_factory(
        node_id="flap-node", queue_size=32, extra=daemon_extra(stack, "flap") + ONE_THREAD
    )
    wait_link(d, True)
    ids: list[str] = []
    flaps = 3
    with connect(d.socket_path) as c:
        collector = EventCollector(c)
        try:
            for _ in range(flaps):
                for phase in ("up", "down"):
                    for _ in range(2):
                        ids.append(f"f{len(ids)}")
                        escalate(c.send, ids[-1])
                        time.sleep(1.0)
                    assert cloud.proc is not None
                    if phase == "up":
                        cloud.proc.kill()  # kill -9: the broker's last second may be lost
                        cloud.proc.wait()
                    else:
                        cloud.start()
            t = collect_escalations(collector, ids)
        finally:
            collector.stop()
            if cloud.proc is None or cloud.proc.poll() is not None:
                cloud.start()
    with connect(d.socket_path) as c:
        link = c.op("status")["escalation"]
    assert d.stop() == 0
    assert t["lost"] == 0 and t["duplicated"] == 0, t
    assert link["link"]["disconnects"] >= flaps, link  # the faults did happen
    assert "Traceback" not in d.log()
    record(
        "broker: cloud broker flapping",
        category="broker",
        load=f"{len(ids)} escalations over the socket, one a second",
        faults=f"cloud broker kill -9 / restart {flaps} times, about 2 s down, 2 s up",
        inputs="valid requests flagged escalate",
        accepted=len(ids),
        answered=t["answered"],
        lost=t["lost"],
        duplicated=t["duplicated"],
        figures={
            "outcomes": t["statuses"],
            "cloud_disconnects": link["link"]["disconnects"],
            "escalations_sent": link.get("sent", 0),
            "duplicate_cloud_answers_ignored": link.get("duplicate_answers", 0),
            "cloud_answers_after_busy": t["cloud_answers_after_busy"],
        },
    )


def test_cloud_link_partition_while_escalations_flow(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    proxy = TcpProxy(stack["cloud"].port)
    d = daemon_factory(
        node_id="part-node",
        queue_size=32,
        extra=daemon_extra(stack, "partition", cloud_port=proxy.port) + ONE_THREAD,
    )
    ids: list[str] = []
    cycles = 2
    try:
        wait_link(d, True)
        with connect(d.socket_path) as c:
            collector = EventCollector(c)
            try:
                for _ in range(cycles):
                    for _ in range(2):  # link up
                        ids.append(f"p{len(ids)}")
                        escalate(c.send, ids[-1])
                        time.sleep(0.8)
                    proxy.partition()  # silent: only keepalive finds out
                    for _ in range(6):
                        ids.append(f"p{len(ids)}")
                        escalate(c.send, ids[-1])
                        time.sleep(0.8)
                    proxy.heal()
                    wait_link(d, True, timeout=30)
                t = collect_escalations(collector, ids)
            finally:
                collector.stop()
        with connect(d.socket_path) as c:
            link = c.op("status")["escalation"]
        assert d.stop() == 0
    finally:
        d.stop()
        proxy.close()
    assert t["lost"] == 0 and t["duplicated"] == 0, t
    assert link["link"]["disconnects"] >= cycles, link
    assert "Traceback" not in d.log()
    record(
        "broker: cloud link partition",
        category="broker",
        load=f"{len(ids)} escalations over the socket, one every 0.8 s",
        faults=f"cloud link blackholed by a TCP relay {cycles} times for about 5 s "
        "(no RST, keepalive must notice), then healed",
        inputs="valid requests flagged escalate",
        accepted=len(ids),
        answered=t["answered"],
        lost=t["lost"],
        duplicated=t["duplicated"],
        figures={
            "outcomes": t["statuses"],
            "cloud_disconnects": link["link"]["disconnects"],
            "escalations_sent": link.get("sent", 0),
            "duplicate_cloud_answers_ignored": link.get("duplicate_answers", 0),
            "cloud_answers_after_busy": t["cloud_answers_after_busy"],
        },
    )


def test_an_escalation_sent_before_its_worker_is_back_goes_out_when_it_returns(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The cloud broker dies with the worker's retained `online` saved, and comes back before
    the worker does: the edge takes the link for up and sends an escalation that no worker is
    there to take. When the worker reconnects and says `online`, the escalation goes out again
    at once, not `resend_s` (300 s) later. This was the flapping test's rare loss."""
    cloud: Broker = stack["cloud"]
    worker = stack["worker"].proc
    d = daemon_factory(node_id="back-node", extra=daemon_extra(stack, "back", timeout_s=60.0))
    wait_link(d, True)
    try:
        saved_now(cloud)  # the retained `online` is on disk
        worker.send_signal(signal.SIGSTOP)  # before its keepalive lapses and its Will fires
        assert cloud.proc is not None
        cloud.proc.kill()
        cloud.proc.wait()
        cloud.start()
        wait_link(d, True)  # up on the retained `online` alone: the worker is stopped
        with connect(d.socket_path) as c:
            c.send({"id": "back", "prompt": "Name a metal.", "max_tokens": 8, "escalate": True})
            time.sleep(2)  # sent while no worker is connected
            worker.send_signal(signal.SIGCONT)
            events = c.until_final("back")
            link = c.op("status")["escalation"]
    finally:
        worker.send_signal(signal.SIGCONT)
        if cloud.proc is None or cloud.proc.poll() is not None:
            cloud.start()
    done = events[-1]
    assert done["event"] == "done" and done["source"] == "cloud", done
    assert done["escalation"]["status"] == "answered", done
    assert link["link"].get("worker_returns", 0) >= 1, link
    assert link.get("resent_on_worker_return", 0) >= 1, link
    record(
        "broker: cloud broker back before its worker",
        category="broker",
        load="1 escalation over the socket",
        faults="cloud broker kill -9 with the worker stopped; broker back first (the worker's "
        "retained online makes the link look up), the worker 2 s later",
        inputs="a valid request flagged escalate",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={
            "resent_on_worker_return": link.get("resent_on_worker_return", 0),
            "cloud_answer_ms": done["timings"]["total_ms"],
        },
    )
