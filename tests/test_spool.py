"""The escalation spool on a real sqlite file: durability, order, bounds, exactly-once outcomes."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from edgeagent import spool as sp
from edgeagent.spool import EscalationSpool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(path: Path, clock: Clock, max_waiting: int = 100) -> EscalationSpool:
    return EscalationSpool(path, max_waiting=max_waiting, max_age_s=60, result_ttl_s=600,
                           clock=clock)  # fmt: skip


def add(s: EscalationSpool, n: int, topic: str | None = "replies/x") -> sp.Entry:
    entry, created, _ = s.add(f"e{n}", f"r{n}", {"reason": "flag"}, {"messages": [n]}, topic,
                              b"c")  # fmt: skip
    assert created
    return entry


def test_survives_reopen_in_order(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.sqlite", clock)
    for n in range(3):
        add(s, n)
    s.close()
    s = make(tmp_path / "s.sqlite", clock)
    assert [e.id for e in s.waiting(10)] == ["e0", "e1", "e2"]
    assert [e.id for e in s.waiting(10, frozenset({"e0"}))] == ["e1", "e2"]
    assert s.get("e1") is not None and s.get("e1").payload == {"messages": [1]}  # type: ignore[union-attr]
    assert s.get("e1").correlation == b"c"  # type: ignore[union-attr]


def test_same_id_is_stored_once(tmp_path: Path) -> None:
    s = make(tmp_path / "s.sqlite", Clock())
    add(s, 1)
    entry, created, dropped = s.add("e1", "other", {}, {}, None, None)
    assert not created and not dropped and entry.request_id == "r1"


def test_an_outcome_is_recorded_once(tmp_path: Path) -> None:
    s = make(tmp_path / "s.sqlite", Clock())
    add(s, 1)
    assert s.finish("e1", sp.ANSWERED, {"text": "first"})
    assert not s.finish("e1", sp.ANSWERED, {"text": "second"})
    assert not s.finish("e1", sp.FAILED, {"code": "x"})
    entry = s.get("e1")
    assert entry is not None and entry.state == sp.ANSWERED and entry.answer == {"text": "first"}
    assert [e.id for e in s.undelivered()] == ["e1"]
    s.mark_delivered("e1")
    assert s.undelivered() == []
    assert s.find("r1", "") == s.get("e1")


def test_full_spool_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    s = make(tmp_path / "s.sqlite", Clock(), max_waiting=2)
    add(s, 1)
    add(s, 2)
    _, _, dropped = s.add("e3", "r3", {}, {}, "replies/x", None)
    assert [e.id for e in dropped] == ["e1"]
    assert [e.id for e in s.waiting(10)] == ["e2", "e3"]
    assert s.get("e1").state == sp.DROPPED  # type: ignore[union-attr]
    counts = s.counts()
    assert counts["waiting"] == 2 and counts["dropped_total"] == 1
    assert [e.id for e in s.undelivered()] == ["e1"]  # the requester hears of it


def test_age_bound_and_result_ttl(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.sqlite", clock)
    add(s, 1)
    clock.now += 30
    add(s, 2)
    clock.now += 31  # e1 is 61 s old, e2 31 s
    assert [e.id for e in s.expire()] == ["e1"]
    assert s.get("e1").state == sp.EXPIRED  # type: ignore[union-attr]
    assert [e.id for e in s.waiting(10)] == ["e2"]
    assert s.counts()["expired_total"] == 1
    clock.now += 601  # finished rows are forgotten after result_ttl_s
    s.expire()
    assert s.get("e1") is None


def test_a_client_finds_only_its_own_escalations(tmp_path: Path) -> None:
    s = make(tmp_path / "s.sqlite", Clock())
    s.add("ea", "1", {}, {"messages": ["a"]}, None, None, "uid:1000")
    s.add("eb", "1", {}, {"messages": ["b"]}, None, None, "uid:1001")
    mine = s.find("1", "uid:1000")
    assert mine is not None and mine.id == "ea" and mine.payload == {"messages": ["a"]}
    assert s.find("ea", "uid:1001") is None  # by escalation id, not another client's
    theirs = s.find("1", "uid:1001")
    assert theirs is not None and theirs.id == "eb"
    assert s.find("1", "mqtt:replies/x") is None


def test_one_client_cannot_push_out_the_others(tmp_path: Path) -> None:
    big = {"messages": ["x" * 1000]}
    s = EscalationSpool(tmp_path / "s.sqlite", max_waiting=100, max_age_s=60, result_ttl_s=600,
                        client_max=3, client_bytes=2500, max_bytes=4000)  # fmt: skip
    s.add("other", "o", {}, {"messages": ["y"]}, None, None, "uid:2")
    s.add("a1", "1", {}, big, None, None, "uid:1")
    s.add("a2", "2", {}, big, None, None, "uid:1")
    with pytest.raises(sp.QuotaExceeded, match="2 escalation"):  # the bytes would pass 2500
        s.add("a3", "3", {}, big, None, None, "uid:1")
    assert s.get("a3") is None and s.get("other").state == sp.WAITING  # type: ignore[union-attr]
    assert s.counts()["refused_total"] == 1
    small = {"messages": ["z"]}
    s.add("a4", "4", {}, small, None, None, "uid:1")
    with pytest.raises(sp.QuotaExceeded, match="3 escalation"):  # the count
        s.add("a5", "5", {}, small, None, None, "uid:1")
    # The global byte bound makes room from the client with the most bytes waiting.
    _, _, dropped = s.add("b1", "b", {}, {"messages": ["w" * 2400]}, None, None, "uid:3")
    assert [e.id for e in dropped] == ["a1"]
    assert s.get("other").state == sp.WAITING  # type: ignore[union-attr]
    # What is finished keeps its outcome, not the question's bytes.
    assert s.get("a1").payload == {}  # type: ignore[union-attr]
    s.finish("a2", sp.ANSWERED, {"text": "done"})
    assert s.get("a2").payload == {} and s.get("a2").answer == {"text": "done"}  # type: ignore[union-attr]


def test_the_spool_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "s.sqlite"
    old = os.umask(0o002)  # as loose as a misconfigured service
    try:
        s = make(path, Clock())
        add(s, 1)
    finally:
        os.umask(old)
    for f in (path, path.with_name("s.sqlite-wal"), path.with_name("s.sqlite-shm")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    s.close()
    os.chmod(path, 0o660)  # a spool written by an older release under UMask=0007
    make(path, Clock()).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_spool_from_the_first_release_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE escalations (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL "
        "UNIQUE, created REAL NOT NULL, request_id TEXT NOT NULL, reason TEXT NOT NULL, "
        "payload TEXT NOT NULL, reply_topic TEXT, correlation BLOB, state TEXT NOT NULL, "
        "answer TEXT, finished REAL, delivered INTEGER NOT NULL DEFAULT 0);"
    )
    db.execute(
        "INSERT INTO escalations (id, created, request_id, reason, payload, state) "
        "VALUES ('old', 1, 'r', '{}', '{}', 'waiting')"
    )
    db.commit()
    db.close()
    s = make(path, Clock())
    assert s.get("old") is not None and s.get("old").client == ""  # type: ignore[union-attr]
    add(s, 1)
    assert [e.id for e in s.waiting(10)] == ["old", "e1"]
