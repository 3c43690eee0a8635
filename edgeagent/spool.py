"""The escalation spool: every escalation on disk (sqlite, WAL, fsync'd) until the cloud answers.

One row per escalation, from the moment it is accepted until its answer has been delivered and
has outlived `result_ttl_s`. Waiting rows are bounded in number, bytes and age; the oldest are
dropped first and counted. Each row belongs to the client that asked (its identity): only that
client finds it with `find`, and one client's waiting rows are bounded on their own, so that
no client can push out everyone else's questions. The file holds every escalated question and
answer: it is created readable by the daemon's user only. The class is synchronous and not
thread-safe: the daemon calls it from one dedicated thread (see escalation.py), tests call it
directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

WAITING, ANSWERED, FAILED, DROPPED, EXPIRED, CANCELLED = (
    "waiting", "answered", "failed", "dropped", "expired", "cancelled",
)  # fmt: skip
FINISHED = (ANSWERED, FAILED, DROPPED, EXPIRED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS escalations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    created     REAL NOT NULL,
    request_id  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    reply_topic TEXT,
    correlation BLOB,
    state       TEXT NOT NULL,
    answer      TEXT,
    finished    REAL,
    delivered   INTEGER NOT NULL DEFAULT 0,
    client      TEXT NOT NULL DEFAULT '',
    size        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS escalations_state ON escalations (state, seq);
CREATE INDEX IF NOT EXISTS escalations_request ON escalations (request_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Columns added after the first release: a spool written by it gains them on open.
ADDED_COLUMNS = {
    "client": "TEXT NOT NULL DEFAULT ''",
    "size": "INTEGER NOT NULL DEFAULT 0",
}
INDEXES = "CREATE INDEX IF NOT EXISTS escalations_client ON escalations (client, state);"


class QuotaExceeded(Exception):
    """The asking client already has as many escalations waiting as it may; not stored."""


@dataclass(frozen=True)
class Entry:
    seq: int
    id: str
    created: float
    request_id: str
    reason: dict[str, Any]
    payload: dict[str, Any]
    reply_topic: Optional[str]
    correlation: Optional[bytes]
    state: str
    answer: Optional[dict[str, Any]]
    finished: Optional[float]
    delivered: bool
    client: str = ""
    new: bool = True  # stored by this request (False: found, stored by an earlier delivery)


class EscalationSpool:
    def __init__(
        self,
        path: Path,
        *,
        max_waiting: int,
        max_age_s: float,
        result_ttl_s: float,
        max_bytes: int = 1 << 62,
        client_max: int = 1 << 62,
        client_bytes: int = 1 << 62,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_waiting, self.max_age_s, self.result_ttl_s = max_waiting, max_age_s, result_ttl_s
        self.max_bytes, self.client_max, self.client_bytes = max_bytes, client_max, client_bytes
        self.clock = clock
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(path)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit is fsync'd before it returns, so an accepted escalation survives
        # a power cut, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(escalations)")}
        for column, decl in ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE escalations ADD COLUMN {column} {decl}")
        self._db.executescript(INDEXES)
        for suffix in ("-wal", "-shm"):  # sqlite gives them the database's mode, but an
            _owner_only(path.with_name(path.name + suffix), create=False)  # older spool's

    def close(self) -> None:
        self._db.close()

    # --- writes (each one transaction, durable when it returns) ------------------------------

    def add(
        self,
        esc_id: str,
        request_id: str,
        reason: dict[str, Any],
        payload: dict[str, Any],
        reply_topic: Optional[str] = None,
        correlation: Optional[bytes] = None,
        client: str = "",
    ) -> tuple[Entry, bool, list[Entry]]:
        """Store a new escalation; returns (entry, created, entries dropped to make room).

        An id already stored is not stored again: (existing entry, False, []). Raises
        QuotaExceeded when `client` has client_max escalations or client_bytes waiting.
        """
        existing = self.get(esc_id)
        if existing is not None:
            return existing, False, []
        now = self.clock()
        body = json.dumps(payload)
        size = len(body.encode()) + len((reply_topic or "").encode()) + len(correlation or b"")
        dropped: list[Entry] = []
        mine, my_bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM escalations "
            "WHERE client = ? AND state = ?",
            (client, WAITING),
        ).fetchone()
        if mine + 1 > self.client_max or my_bytes + size > self.client_bytes:
            with self._tx():
                self._count("refused", 1)
            raise QuotaExceeded(
                f"this client has {mine} escalation(s) of {my_bytes} bytes waiting; at most "
                f"{self.client_max} and {self.client_bytes} bytes may wait per client"
            )
        with self._tx():
            # Make room, oldest first from the client with the most bytes waiting: whoever
            # fills the spool makes the room, not the others.
            waiting: dict[str, list[tuple[str, int]]] = {}
            for row_id, row_client, row_size in self._db.execute(
                "SELECT id, client, size FROM escalations WHERE state = ? ORDER BY seq", (WAITING,)
            ):
                waiting.setdefault(row_client, []).append((row_id, row_size))
            held = {who: sum(n for _, n in rows) for who, rows in waiting.items()}
            count, total = sum(len(rows) for rows in waiting.values()), sum(held.values())
            gone: list[str] = []
            while count and (count + 1 > self.max_waiting or total + size > self.max_bytes):
                who = max(held, key=lambda c: (held[c], len(waiting[c])))
                row_id, row_size = waiting[who].pop(0)
                held[who] -= row_size
                if not waiting[who]:
                    del waiting[who], held[who]
                gone.append(row_id)
                count, total = count - 1, total - row_size
            if gone:
                dropped = [e for e in (self.get(i) for i in gone) if e is not None]
                self._finish(gone, DROPPED, now)
                self._count("dropped", len(gone))
            self._db.execute(
                "INSERT INTO escalations (id, created, request_id, reason, payload, reply_topic,"
                " correlation, state, client, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (esc_id, now, request_id, json.dumps(reason), body, reply_topic, correlation,
                 WAITING, client, size),
            )  # fmt: skip
        entry = self.get(esc_id)
        assert entry is not None
        return entry, True, [e for e in (self.get(d.id) for d in dropped) if e is not None]

    def finish(self, esc_id: str, state: str, answer: Optional[dict[str, Any]] = None) -> bool:
        """Record the outcome of a waiting escalation; False if it was no longer waiting."""
        assert state in FINISHED
        with self._tx():
            # The question is not needed any more (outcomes carry the answer): its bytes go.
            cur = self._db.execute(
                "UPDATE escalations SET state = ?, answer = ?, finished = ?, payload = '{}' "
                "WHERE id = ? AND state = ?",
                (state, json.dumps(answer) if answer is not None else None, self.clock(), esc_id,
                 WAITING),
            )  # fmt: skip
            changed = cur.rowcount == 1
            if changed:
                self._count(state, 1)
        return changed

    def mark_delivered(self, esc_id: str) -> None:
        with self._tx():
            self._db.execute("UPDATE escalations SET delivered = 1 WHERE id = ?", (esc_id,))

    def expire(self) -> list[Entry]:
        """Give up on escalations waiting longer than max_age_s; forget old finished ones."""
        now = self.clock()
        with self._tx():
            rows = self._db.execute(
                "SELECT * FROM escalations WHERE state = ? AND created < ? ORDER BY seq",
                (WAITING, now - self.max_age_s),
            ).fetchall()
            expired = [dataclasses.replace(_entry(r), state=EXPIRED, finished=now) for r in rows]
            self._finish([e.id for e in expired], EXPIRED, now)
            self._count(EXPIRED, len(expired))
            self._db.execute(
                "DELETE FROM escalations WHERE state != ? AND finished < ?",
                (WAITING, now - self.result_ttl_s),
            )
        return expired

    # --- reads --------------------------------------------------------------------------------

    def get(self, esc_id: str) -> Optional[Entry]:
        row = self._db.execute("SELECT * FROM escalations WHERE id = ?", (esc_id,)).fetchone()
        return _entry(row) if row else None

    def find(self, key: str, client: str) -> Optional[Entry]:
        """`client`'s escalation by its id, else `client`'s newest one of that request id."""
        row = self._db.execute(
            "SELECT * FROM escalations WHERE client = ? AND (id = ? OR request_id = ?) "
            "ORDER BY id = ? DESC, seq DESC LIMIT 1",
            (client, key, key, key),
        ).fetchone()
        return _entry(row) if row else None

    def waiting(self, limit: int, exclude: frozenset[str] = frozenset()) -> list[Entry]:
        """The oldest waiting escalations, in the order they were accepted."""
        out: list[Entry] = []
        for row in self._db.execute(
            "SELECT * FROM escalations WHERE state = ? ORDER BY seq", (WAITING,)
        ):
            if row["id"] not in exclude:
                out.append(_entry(row))
                if len(out) >= limit:
                    break
        return out

    def undelivered(self) -> list[Entry]:
        """Finished escalations whose outcome has not reached an MQTT requester yet."""
        rows = self._db.execute(
            "SELECT * FROM escalations WHERE state IN (?, ?, ?, ?) AND delivered = 0 "
            "AND reply_topic IS NOT NULL ORDER BY seq",
            (ANSWERED, FAILED, DROPPED, EXPIRED),
        ).fetchall()
        return [_entry(r) for r in rows]

    def counts(self) -> dict[str, int]:
        out = {
            row[0]: row[1]
            for row in self._db.execute("SELECT state, count(*) FROM escalations GROUP BY state")
        }
        out["waiting"] = out.get(WAITING, 0)
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            out[f"{name}_total"] = value
        return out

    # --- internals ----------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def _finish(self, ids: list[str], state: str, now: float) -> None:
        self._db.executemany(
            "UPDATE escalations SET state = ?, finished = ?, payload = '{}' WHERE id = ?",
            [(state, now, i) for i in ids],
        )

    def _count(self, name: str, n: int) -> None:
        if n:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        seq=row["seq"],
        id=row["id"],
        created=row["created"],
        request_id=row["request_id"],
        reason=json.loads(row["reason"]),
        payload=json.loads(row["payload"]),
        reply_topic=row["reply_topic"],
        correlation=row["correlation"],
        state=row["state"],
        answer=json.loads(row["answer"]) if row["answer"] else None,
        finished=row["finished"],
        delivered=bool(row["delivered"]),
        client=row["client"],
    )


def _owner_only(path: Path, create: bool = True) -> None:
    """Make `path` (created empty if missing and `create`) readable by its owner only."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
