"""Process faults: the daemon killed -9 mid-generation and mid-spool-write, the cloud worker
killed -9 mid-answer, the spool's disk full. Nothing accepted may be lost, answered twice or
corrupted."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from tests.conftest import Conn, Daemon, connect
from tests.faults.conftest import (
    ONE_THREAD,
    EventCollector,
    RecordingRequester,
    TcpProxy,
    escalation_tally,
    fill_up,
    finals_per_id,
    small_filesystem,
    tally,
    wait_until,
)
from tests.mqtt_helpers import Broker, Requester, free_port
from tests.reliability import record
from tests.test_escalation import (  # noqa: F401 (stack: fixture)
    Process,
    daemon_extra,
    stack,
    wait_link,
)
from tests.test_mqtt import mqtt_section


def wait_status(r: Requester, topic: str, state: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, _ = r.next(timeout=max(0.01, deadline - time.monotonic()), topic=topic)
        if status.get("state") == state:
            return status


def integrity(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """sqlite's own verdict on the spool file, and its (request id, state) rows."""
    db = sqlite3.connect(str(path))
    try:
        verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = db.execute("SELECT request_id, state FROM escalations ORDER BY seq").fetchall()
    finally:
        db.close()
    return verdict, rows


def test_daemon_kill_9_mid_generation(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    b = Broker(tmp_path).start()
    d = daemon_factory(
        node_id="crash-gen", extra=mqtt_section(b, client_id="crash-gen") + ONE_THREAD
    )
    status_topic = "edgeagent/crash-gen/status"
    r = RecordingRequester(b.port, persistent=True)
    ids = [f"g{i}" for i in range(4)]
    try:
        r.wait_online(status_topic)
        for rid in ids:
            r.publish(
                "edgeagent/crash-gen/ask",
                {"id": rid, "max_tokens": 48, "prompt": f"Describe hand tool number {rid[-1]}."},
                response_topic=r.reply_topic,
            )
        # g0 answered, g1 in the middle of its answer, g2 and g3 queued in the daemon.
        assert wait_until(
            lambda: sum(1 for e in r.events() if e.get("id") == "g1") >= 3, 120, 0.01
        ), r.events()
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        before = finals_per_id(r.events())
        will = wait_status(r, status_topic, "offline")
        d.start()
        wait_status(r, status_topic, "online")
        r.wait_finals(ids, timeout=240)
        time.sleep(3)  # a second answer would arrive now
    finally:
        r.close()
        d.stop()
        b.stop()
    finals = finals_per_id(r.events())
    counts = tally(ids, finals)
    assert set(before) == {"g0"}, before  # the kill came mid-generation
    assert will == {"state": "offline", "node_id": "crash-gen", "reason": "connection lost"}
    assert counts == {"answered": 4, "lost": 0, "duplicated": 0}, (counts, finals)
    assert all(finals[rid][0]["event"] == "done" for rid in ids), finals
    record(
        "process: daemon kill -9 mid-generation",
        category="process",
        load="4 MQTT v5 requests of 48 tokens",
        faults="daemon kill -9 while the 2nd request generates, restarted",
        inputs="valid requests",
        accepted=len(ids),
        answered=counts["answered"],
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        figures={"answered_before_kill": len(before), "last_will": will["reason"]},
    )


def test_daemon_kill_9_during_spool_writes(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    proxy = TcpProxy(stack["cloud"].port)
    proxy.partition()  # the cloud is unreachable: every escalation goes to the spool
    spool = stack["work"] / "spoolcrash.sqlite"
    d = daemon_factory(
        node_id="spool-crash",
        extra=daemon_extra(
            stack, "spoolcrash", cloud_port=proxy.port, offline="queue", max_tokens=2
        )
        + ONE_THREAD,
    )
    status_topic = "edgeagent/spool-crash/status"
    r = Requester(stack["local"].port)
    conns: list[Conn] = []
    n_conns, per_conn = 3, 20  # within the socket's 32 in flight per connection
    try:
        r.wait_online(status_topic)
        conns = [connect(d.socket_path) for _ in range(n_conns)]
        collectors = [EventCollector(c) for c in conns]
        for i, c in enumerate(conns):
            c.send_raw(
                b"".join(
                    (
                        f'{{"id": "q{i}-{j:02d}", "prompt": "Spooled question {i}-{j}?", '
                        '"escalate": true}\n'
                    ).encode()
                    for j in range(per_conn)
                )
            )

        def queued() -> list[dict[str, Any]]:
            return [e for col in collectors for e in col.events() if e.get("event") == "done"]

        # Kill with the spool thread in the middle of its writes.
        assert wait_until(lambda: len(queued()) >= 20, 60, 0.005), d.log()
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        for col in collectors:
            col.stop()
        accepted = sorted({e["id"] for e in queued()})
        assert all(e["escalation"]["status"] == "queued" for e in queued())
        will = wait_status(r, status_topic, "offline")
        verdict, rows = integrity(spool)
        stored = [rid for rid, _ in rows]
        # Accepted means on disk: every `done` the terminals got has its row, still waiting.
        assert verdict == "ok"
        assert set(accepted) <= set(stored), sorted(set(accepted) - set(stored))
        assert all(state == "waiting" for _, state in rows), rows
        assert len(stored) == len(set(stored))
        proxy.heal()
        d.start()
        wait_link(d, True)
        results: dict[str, dict[str, Any]] = {}
        with connect(d.socket_path) as c:

            def all_answered() -> bool:
                for rid in stored:
                    if results.get(rid, {}).get("status") != "answered":
                        results[rid] = c.op("result", id=rid)
                return all(results[rid]["status"] == "answered" for rid in stored)

            wait_until(all_answered, 180, 0.5)
            link = c.op("status")["escalation"]
        verdict_after, rows_after = integrity(spool)
    finally:
        for c in conns:
            c.sock.close()
        r.close()
        d.stop()
        proxy.close()
    answered = [rid for rid in stored if results.get(rid, {}).get("status") == "answered"]
    lost = [rid for rid in accepted if rid not in answered]
    assert will["state"] == "offline" and will["reason"] == "connection lost"
    assert not lost, (lost, {rid: results.get(rid) for rid in lost})
    assert all(results[rid]["text"].strip() for rid in answered)
    assert verdict_after == "ok" and len(rows_after) == len(stored)
    assert "Traceback" not in d.log()
    record(
        "process: daemon kill -9 during spool writes",
        category="process",
        load=f"{n_conns * per_conn} escalations pipelined on {n_conns} terminals, cloud "
        "unreachable ([escalation] offline = queue)",
        faults=f"daemon kill -9 after {len(accepted)} escalations were acknowledged, spool "
        "writes still going; restarted with the cloud link healed",
        inputs="valid requests flagged escalate",
        accepted=len(accepted),
        answered=len([rid for rid in accepted if rid in answered]),
        lost=len(lost),
        duplicated=0,
        figures={
            "spool_integrity_check": verdict,
            "rows_after_kill": len(stored),
            "rows_stored_not_yet_acknowledged": len(set(stored) - set(accepted)),
            "answered_after_restart": len(answered),
            "duplicate_cloud_answers_ignored": link.get("duplicate_answers", 0),
            "last_will": will["reason"],
        },
    )


def test_cloud_worker_kill_9_mid_answer(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    worker: Process = stack["worker"]
    d = daemon_factory(node_id="wk-node", extra=daemon_extra(stack, "workerkill") + ONE_THREAD)
    wait_link(d, True)
    ids = ["w0", "w1", "w2"]
    try:
        with connect(d.socket_path) as c:
            collector = EventCollector(c)
            try:
                c.send(
                    {
                        "id": "w0",
                        "prompt": "Describe a lathe in detail.",
                        "max_tokens": 64,
                        "escalate": True,
                    }
                )
                assert wait_until(
                    lambda: any(e.get("id") == "w0" for e in collector.events()), 60, 0.005
                )  # the cloud answer is streaming
                assert worker.proc is not None
                worker.proc.kill()
                worker.proc.wait()
                answered_before_kill = finals_per_id(collector.events())
                for rid in ids[1:]:  # asked while no worker is there
                    c.send(
                        {
                            "id": rid,
                            "prompt": f"Name metal number {rid[1]}.",
                            "max_tokens": 8,
                            "escalate": True,
                        }
                    )
                time.sleep(1.0)
                worker.start()
                deadline = time.monotonic() + 180
                while True:
                    t = escalation_tally(ids, collector.events())
                    done = t["answered"] + t["duplicated"] == len(ids)
                    if (done and not t["waiting_for_cloud"]) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                time.sleep(3)  # a second answer would arrive now
                t = escalation_tally(ids, collector.events())
                t["lost"] += len(t["waiting_for_cloud"])
            finally:
                collector.stop()
        events = collector.events()
    finally:
        d.stop()
    assert "w0" not in answered_before_kill  # the kill came mid-answer
    assert t["lost"] == 0 and t["duplicated"] == 0, t
    w0 = [e for e in events if e.get("id") == "w0"]
    w0_done = next(e for e in w0 if e["event"] == "done")
    resets = [i for i, e in enumerate(w0) if e["event"] == "restart"]
    since = w0[resets[-1] + 1 :] if resets else w0
    streamed = "".join(e["text"] for e in since if e["event"] == "token")
    # Streamed before the kill, then either streamed again by the restarted worker or
    # answered locally after a cloud timeout: a restart event voids the first part either way.
    assert resets and streamed == w0_done["text"], w0
    record(
        "process: cloud worker kill -9 mid-answer",
        category="process",
        load="1 escalation streaming from the cloud, 2 more asked while no worker runs",
        faults="cloud worker kill -9 mid-answer, restarted 1 s later",
        inputs="valid requests flagged escalate",
        accepted=len(ids),
        answered=t["answered"],
        lost=t["lost"],
        duplicated=t["duplicated"],
        figures={
            "outcomes": t["statuses"],
            "w0_resets": len(resets),
        },
    )


def test_spool_disk_full(
    tmp_path: Path,
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
) -> None:
    mount = tmp_path / "spool"
    with small_filesystem(mount, 512) as kind:
        spool = mount / "escalations.sqlite"
        d = daemon_factory(
            node_id="full-node",
            extra=daemon_extra(
                stack, "full", cloud_port=free_port(), offline="queue", spool_path=str(spool)
            )
            + ONE_THREAD,
        )
        try:
            with connect(d.socket_path) as c:

                def ask(rid: str, size: int = 0) -> dict[str, Any]:
                    c.send({"id": rid, "prompt": f"Question {rid}? " + "x" * size,
                            "escalate": True, "max_tokens": 8})  # fmt: skip
                    return c.until_final(rid)[-1]

                before = [ask(f"a{i}") for i in range(3)]
                filler = fill_up(mount)
                during = {}
                for i in range(20):  # until the spool's free pages run out
                    during[f"f{i}"] = ask(f"f{i}", 2000)
                    if during[f"f{i}"]["escalation"]["status"] == "error":
                        break
                alive = c.op("status")
                filler.unlink()
                after = [ask(f"b{i}") for i in range(2)]
            assert d.stop() == 0
        finally:
            d.stop()
        verdict, rows = integrity(spool)
    refused = {rid: e for rid, e in during.items() if e["escalation"]["status"] == "error"}
    taken = [rid for rid in during if rid not in refused]
    for event in before + after + [during[rid] for rid in taken]:
        assert event["event"] == "done" and event["escalation"]["status"] == "queued", event
    assert refused, during  # the disk did fill up
    for rid, event in refused.items():
        # Not stored, so not sent: the local model answers, and says why.
        assert event["event"] == "done" and event["id"] == rid, event
        assert event["source"] == "local" and event["text"], event
        assert (
            f"the escalation spool {spool} could not store the question: database or disk is full"
        ) in event["escalation"]["message"], event
    assert alive["state"] == "ready"
    assert verdict == "ok"
    expected = [f"a{i}" for i in range(3)] + taken + [f"b{i}" for i in range(2)]
    assert [rid for rid, _ in rows] == expected  # what was acknowledged is there, nothing else
    assert "database or disk is full" in d.log()
    assert "Traceback" not in d.log()  # an operator's problem, said in one line
    record(
        "process: spool disk full",
        category="process",
        load="escalations with 2 KB prompts, cloud unreachable ([escalation] offline = queue)",
        faults=f"the spool's filesystem ({kind}, 512 KB) filled up, then space freed",
        inputs="valid requests flagged escalate",
        accepted=len(expected),
        answered=len(expected),
        lost=0,
        duplicated=0,
        figures={
            "answered_locally_not_stored": len(refused),
            "stored_before_full": len(taken) + 3,
            "escalation_status": next(iter(refused.values()))["escalation"]["status"],
            "escalation_message": next(iter(refused.values()))["escalation"]["message"].replace(
                str(spool), "<spool>"
            ),
            "spool_integrity_check": verdict,
        },
    )
