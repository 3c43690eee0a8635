"""The escalation spool on a real sqlite file: durability, order, bounds, exactly-once outcomes."""

from __future__ import annotations

from pathlib import Path

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
    assert s.find("r1") == s.get("e1")


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
