"""The batched engine end to end: real daemons, real model, several terminals at once.

Greedy answers must not depend on what else was in the batch; a cancel frees its slot without
touching the others; sessions and system prompts reuse their KV cells (also across a restart);
the queue, slot, priority and per-client limits hold.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import pytest

from tests.conftest import Conn, Daemon, connect

QUESTIONS = [
    "What is a torque wrench used for?",
    "Name three protective items for welding.",
    "Explain lockout tagout in one sentence.",
    "Why can a conveyor belt slip?",
]


def ask(rid: str, prompt: str, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [e for e in events if e["event"] in ("done", "error")]
    assert len(finals) == 1, events
    return finals[0]


class Reader(threading.Thread):
    """Reads one connection's events in the background, stamping each with its arrival."""

    def __init__(self, conn: Conn, expect: int) -> None:
        super().__init__(daemon=True)
        self.conn, self.expect = conn, expect
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.start()

    def run(self) -> None:
        finals = 0
        while finals < self.expect:
            event = self.conn.read()
            self.events.append((time.monotonic(), event))
            finals += event["event"] in ("done", "error")

    def of(self, rid: str) -> list[tuple[float, dict[str, Any]]]:
        self.join(120)
        assert not self.is_alive(), "no final event in time"
        return [(t, e) for t, e in self.events if e.get("id") == rid]


@pytest.fixture(scope="module")
def batched(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(n_ctx=1024, queue_size=16, engine_extra="parallel = 4")


@pytest.fixture(scope="module")
def alone_answers(batched: Daemon) -> dict[str, str]:
    """Each question asked with nothing else running."""
    out = {}
    with connect(batched.socket_path) as c:
        for i, q in enumerate(QUESTIONS):
            c.send(ask(f"alone{i}", q))
            done = final(c.until_final(f"alone{i}"))
            assert done["event"] == "done" and done["text"].strip()
            assert done["timings"]["peak_batch"] == 1
            out[q] = done["text"]
    return out


def test_greedy_answers_are_the_same_alone_and_batched(
    batched: Daemon, alone_answers: dict[str, str]
) -> None:
    conns = [connect(batched.socket_path) for _ in QUESTIONS]
    try:
        for i, (c, q) in enumerate(zip(conns, QUESTIONS)):
            c.send(ask(f"b{i}", q))
        dones = [final(c.until_final(f"b{i}")) for i, c in enumerate(conns)]
    finally:
        for c in conns:
            c.close()
    assert max(d["timings"]["peak_batch"] for d in dones) >= 3, "the requests did not overlap"
    for q, d in zip(QUESTIONS, dones):
        assert d["event"] == "done"
        assert d["text"] == alone_answers[q], q


def test_cancel_in_a_batch_frees_the_slot_and_leaves_the_others_alone(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(n_ctx=1024, engine_extra="parallel = 2")
    with connect(d.socket_path) as c:
        c.send(ask("ref", QUESTIONS[1], 48))
        reference = final(c.until_final("ref"))["text"]
    a, b, late = (connect(d.socket_path) for _ in range(3))
    try:
        a.send(ask("a", QUESTIONS[0], 200))
        assert a.read()["event"] == "token"
        b.send(ask("b", QUESTIONS[1], 48))
        late.send(ask("late", QUESTIONS[2], 8))  # no slot free: waits in the queue
        a.send({"op": "cancel", "id": "a"})
        cancelled = final(a.until_final("a"))
        b_done = final(b.until_final("b"))
        late_done = final(late.until_final("late"))
    finally:
        for c in (a, b, late):
            c.close()
    assert cancelled["event"] == "error" and cancelled["code"] == "cancelled"
    assert cancelled["text"], "the partial answer comes with the cancel"
    assert b_done["event"] == "done" and b_done["text"] == reference
    # The queued request got the cancelled one's slot while b was still decoding.
    assert late_done["event"] == "done" and late_done["timings"]["peak_batch"] == 2
    with connect(d.socket_path) as c:
        # The slot is handed back just after `done` is sent.
        for _ in range(100):
            if c.op("status")["slots"]["active"] == 0:
                break
            time.sleep(0.05)
        assert c.op("status")["slots"]["active"] == 0


def test_a_session_resumes_from_its_saved_cells(batched: Daemon) -> None:
    with connect(batched.socket_path) as c:
        c.send(ask("t1", "My machine is a hydraulic press. Remember that.", 16, session="press"))
        first = final(c.until_final("t1"))
        assert first["event"] == "done"
        # Fill every slot with other prompts, so the session's own slot is reused.
        ids = {f"fill{i}" for i in range(4)}
        conns = [connect(batched.socket_path) for _ in ids]
        for rid, other in zip(sorted(ids), conns):
            other.send(ask(rid, f"Count to {rid[-1]} please, {rid}.", 8))
        for rid, other in zip(sorted(ids), conns):
            assert final(other.until_final(rid))["event"] == "done"
            other.close()
        c.send(ask("t2", "What machine did I mention?", 16, session="press"))
        second = final(c.until_final("t2"))
    assert second["event"] == "done"
    usage = second["usage"]
    assert usage["cache"] == "session", usage
    # Everything up to the first answer came from the saved cells.
    assert usage["cached_tokens"] >= first["usage"]["total_tokens"] - 1
    assert usage["evaluated_tokens"] == usage["prompt_tokens"] - usage["cached_tokens"]
    assert usage["evaluated_tokens"] < 30


SYSTEM = "\n".join(
    f"Rule {n}: before opening guard {n % 7 + 1}, stop the spindle on panel {n % 5 + 1} and "
    f"lock out breaker Q{n + 10}; the torque limit for fixture F{n} is {20 + n % 13} Nm."
    for n in range(1, 16)
)


def test_the_system_prompt_snapshot_survives_a_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    extra = f"system_prompt = {json.dumps(SYSTEM)}\n"  # a JSON string is a TOML string
    d = daemon_factory(n_ctx=1024, engine_extra="parallel = 2")
    config = d.config_path.read_text().replace("[model]\n", f"[model]\n{extra}", 1)
    d.stop()
    d.config_path.write_text(config)
    # First start: the system prompt is evaluated once and saved.
    d.start()
    with connect(d.socket_path) as c:
        prefix = c.op("status")["slots"]["system_prefix"]
        assert prefix["origin"] == "computed" and prefix["tokens"] > 300
        c.send(ask("first", "What is the torque limit for fixture F3?", 16))
        before = final(c.until_final("first"))
    snapshots = list((d.workdir / "cache" / "prefix").glob("*.kv"))
    assert len(snapshots) == 1
    d.stop()
    # After a restart it is read back, not evaluated: only the question is.
    d.start()
    with connect(d.socket_path) as c:
        prefix = c.op("status")["slots"]["system_prefix"]
        assert prefix["origin"] == "disk"
        c.send(ask("after", "What is the torque limit for fixture F3?", 16))
        after = final(c.until_final("after"))
    assert after["event"] == "done" and after["text"] == before["text"]
    usage = after["usage"]
    assert usage["cache"] == "prefix-disk", usage
    assert usage["cached_tokens"] == prefix["tokens"]
    assert usage["evaluated_tokens"] == usage["prompt_tokens"] - prefix["tokens"] < 40
    d.stop()
    # The same prompt with no snapshot anywhere: every token is evaluated.
    d.config_path.write_text(
        config.replace(extra, "").replace("[engine]\n", '[engine]\nprefix_cache_dir = "off"\n')
    )
    d.start()
    with connect(d.socket_path) as c:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the torque limit for fixture F3?"},
        ]
        c.send({"id": "cold", "messages": messages, "max_tokens": 16, "temperature": 0})
        cold = final(c.until_final("cold"))
    assert cold["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert cold["usage"]["cached_tokens"] == 0 and cold["usage"]["cache"] == "none"
    assert cold["text"] == before["text"]
    # The timings in `done` show where the prompt time went.
    assert after["timings"]["prompt_ms"] < cold["timings"]["prompt_ms"]


def test_queue_and_slot_limits_hold_under_a_burst(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(n_ctx=512, queue_size=4, engine_extra="parallel = 2")
    conns = [connect(d.socket_path) for _ in range(16)]
    try:
        for i, c in enumerate(conns):
            c.send(ask(f"burst{i}", QUESTIONS[i % 4], 12))
        with connect(d.socket_path) as watcher:
            status = watcher.op("status")
        finals = [final(c.until_final(f"burst{i}")) for i, c in enumerate(conns)]
    finally:
        for c in conns:
            c.close()
    assert status["slots"]["active"] <= 2 and status["queue_depth"] <= 4
    done = [f for f in finals if f["event"] == "done"]
    busy = [f for f in finals if f["event"] == "error"]
    assert all(f["code"] == "busy" for f in busy), busy
    assert busy, "16 requests at once must overflow 2 slots + a queue of 4"
    assert len(done) >= 4  # at least a full queue's worth was taken
    assert all(f["timings"]["peak_batch"] <= 2 for f in done)


def test_priority_goes_first_when_a_slot_frees(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(n_ctx=512, engine_extra="parallel = 1")
    hog, low, high = (connect(d.socket_path) for _ in range(3))
    try:
        hog.send(ask("hog", QUESTIONS[0], 40))
        assert hog.read()["event"] == "token"  # the only slot is taken
        low.send(ask("low", QUESTIONS[1], 8, priority=-5))
        time.sleep(0.2)  # low is queued first
        high.send(ask("high", QUESTIONS[2], 8, priority=5))
        readers = {name: Reader(c, 1) for name, c in (("low", low), ("high", high))}
        assert final(hog.until_final("hog"))["event"] == "done"
        low_events, high_events = readers["low"].of("low"), readers["high"].of("high")
    finally:
        for c in (hog, low, high):
            c.close()
    assert high_events[-1][1]["event"] == "done" and low_events[-1][1]["event"] == "done"
    # One slot: low cannot start before high has finished.
    assert high_events[-1][0] < low_events[0][0]


def test_one_client_cannot_take_every_slot(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(n_ctx=512, engine_extra="parallel = 3\nmax_slots_per_client = 1")
    greedy, other = connect(d.socket_path), connect(d.socket_path)
    try:
        greedy.send(ask("g1", QUESTIONS[0], 24))
        greedy.send(ask("g2", QUESTIONS[1], 24))
        assert greedy.read()["id"] == "g1"
        other.send(ask("o1", QUESTIONS[2], 8))
        o1 = final(other.until_final("o1"))
        stream: list[dict[str, Any]] = []
        while sum(e["event"] in ("done", "error") for e in stream) < 2:
            stream.append(greedy.read())
        with connect(d.socket_path) as watcher:
            cap = watcher.op("status")["slots"]["max_per_client"]
    finally:
        greedy.close()
        other.close()
    assert cap == 1
    # o1 ran beside one of the greedy client's requests, never beside both.
    assert o1["event"] == "done" and o1["timings"]["peak_batch"] == 2
    kinds = [(e["id"], e["event"]) for e in stream]
    assert ("g1", "done") in kinds and ("g2", "done") in kinds
    # g2 did not start until g1 had finished, although a third slot was idle.
    assert kinds.index(("g1", "done")) < kinds.index(("g2", "token"))


def test_a_prompt_start_held_by_another_slot_is_copied_not_evaluated(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Two questions about the same station note: the second, arriving while the first runs,
    gets a free slot with nothing in it, and copies the note's cells from the busy slot."""
    d = daemon_factory(n_ctx=1024, node_id="copy-node", engine_extra="parallel = 4")
    note = (
        "Station 7 note: the press runs at 180 bar, the guard must be closed, the two-hand "
        "control must be used, and the die is changed only with the main switch locked out. "
    )
    first, second = note + "What pressure does it run at?", note + "What must be locked out?"
    with connect(d.socket_path) as b:
        b.send(ask("cold", second))
        cold = final(b.until_final("cold"))
    d.stop()  # forget every cell (only the chat template's snapshot stays, on disk)
    d.start()
    with connect(d.socket_path) as a, connect(d.socket_path) as b:
        a.send(ask("runs", first, max_tokens=48))
        assert a.read()["event"] == "token"  # `first` holds a slot
        b.send(ask("copy", second))
        copied = final(b.until_final("copy"))
        running = final(a.until_final("runs"))
    assert cold["usage"]["cache"] == "none"
    assert running["usage"]["cache"] == "prefix-disk" and running["timings"]["peak_batch"] == 2
    usage = copied["usage"]
    assert usage["cache"] == "copied", usage
    assert usage["cached_tokens"] >= len(note.split()), usage  # at least the note's words
    assert usage["evaluated_tokens"] < cold["usage"]["evaluated_tokens"] / 2, (usage, cold)
    assert copied["text"] == cold["text"]  # copied cells answer as evaluated ones do


def test_a_prompt_pushed_out_of_its_slot_comes_back_from_the_prompt_cache(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Two slots, three questions: the third takes the slot of the first, whose cells go to
    the prompt cache; the first question asked again loads them instead of evaluating."""
    d = daemon_factory(n_ctx=1024, engine_extra="parallel = 2")
    with connect(d.socket_path) as c:
        answers = []
        for i, question in enumerate([*QUESTIONS[:3], QUESTIONS[0]]):
            c.send(ask(f"q{i}", question, 16))
            answers.append(final(c.until_final(f"q{i}")))
        cache = c.op("status")["slots"]["prompt_cache"]
    assert all(a["event"] == "done" for a in answers), answers
    first, again = answers[0], answers[3]
    assert first["usage"]["cached_tokens"] < first["usage"]["prompt_tokens"] - 1
    usage = again["usage"]
    assert usage["cache"] == "ram", usage
    assert usage["evaluated_tokens"] == 1, usage  # all but the last token came from RAM
    assert again["text"] == first["text"]  # loaded cells answer as evaluated ones do
    assert cache["stored"] >= 2 and cache["hits"] == 1 and cache["entries"] >= 1, cache
    assert cache["mb"] > 0, cache
