"""The asyncio hub: turns inbound requests into engine jobs and events back to reply sinks.

This is the one place where exceptions become `error` events, and where the rule "every
accepted request gets exactly one final event carrying its id" is enforced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Hashable
from typing import Any, Callable, Optional, Protocol

import psutil

from edgeagent import __version__, protocol
from edgeagent.config import Config
from edgeagent.engine import Engine, EngineBusy, EngineStopped, Event, Job
from edgeagent.protocol import Op, ProtocolError, Request

log = logging.getLogger("edgeagent.dispatcher")

FINAL_EVENTS = ("done", "error")


class ReplySink(Protocol):
    """Where a request's events go. Implemented once per transport (socket, MQTT)."""

    @property
    def peer(self) -> str:
        """Who is asking, for logs."""

    @property
    def scope(self) -> Hashable:
        """Request ids are unique within a scope: a socket connection, an MQTT reply topic."""

    @property
    def max_inflight(self) -> int:
        """How many requests this scope may have in flight at once."""

    @property
    def closed(self) -> bool:
        """The client is gone: its events are dropped."""

    def send(self, event: Event) -> None:
        """Queue an event for the client; called on the event loop, must not block."""


class Stats:
    """Counters and recent latencies for status and metrics."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.served = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.ttft_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self.tokens_per_s: collections.deque[float] = collections.deque(maxlen=1000)

    def record(self, event: Event) -> None:
        if event["event"] == "error":
            self.errors[event["code"]] += 1
            return
        self.served += 1
        timings = event.get("timings", {})
        if timings.get("ttft_ms") is not None:
            self.ttft_ms.append(timings["ttft_ms"])
        if timings.get("tokens_per_s") is not None:
            self.tokens_per_s.append(timings["tokens_per_s"])


def percentile(values: collections.deque[float], pct: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def cpu_temperature() -> Optional[float]:
    """The hottest CPU sensor in degrees C, where the box exposes one (None elsewhere)."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    readings = [
        t.current
        for name, entries in sensors.items()
        if name in ("coretemp", "k10temp", "cpu_thermal", "cpu-thermal", "soc_thermal", "acpitz")
        for t in entries
    ]
    return round(max(readings), 1) if readings else None


class _Inflight:
    __slots__ = ("finished", "job", "sink", "timer")

    def __init__(self, job: Job, sink: ReplySink) -> None:
        self.job, self.sink = job, sink
        self.timer: Optional[asyncio.TimerHandle] = None
        self.finished = False


class Dispatcher:
    def __init__(self, cfg: Config, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.engine, self.loop = cfg, engine, loop
        self.stats = Stats()
        self.accepting = True
        self._inflight: dict[tuple[Hashable, str], _Inflight] = {}
        self._per_scope: collections.Counter[Hashable] = collections.Counter()
        self._process = psutil.Process(os.getpid())
        self.idle = asyncio.Event()
        self.idle.set()
        # Transports add their own section to status (e.g. "mqtt": connection state).
        self.status_sections: dict[str, Callable[[], dict[str, Any]]] = {}

    # --- entry points for transports (event loop only) ------------------------------------

    def handle_payload(self, payload: bytes, sink: ReplySink) -> None:
        """A raw line/payload from a transport: decode, validate, act; errors become events."""
        try:
            obj = protocol.decode(payload)
        except ProtocolError as exc:
            self._reply_error(sink, exc.request_id, exc.code, exc.message)
            return
        self.handle_decoded(obj, sink)

    def handle_decoded(self, obj: Any, sink: ReplySink) -> None:
        """An already decoded JSON value (MQTT strips its transport fields first)."""
        try:
            self.handle(protocol.parse(obj, max_tokens_limit=self.cfg.model.max_tokens), sink)
        except ProtocolError as exc:
            self._reply_error(sink, exc.request_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("unexpected failure handling a request from %s", sink.peer)
            self._reply_error(sink, None, protocol.INTERNAL, f"internal error: {exc}")

    def handle(self, msg: Request | Op, sink: ReplySink) -> None:
        if isinstance(msg, Op):
            self._handle_op(msg, sink)
        else:
            self._submit(msg, sink)

    def sink_closed(self, sink: ReplySink) -> None:
        """The client went away: stop everything it asked for."""
        for entry in [e for e in self._inflight.values() if e.sink is sink]:
            self._stop(entry, protocol.CANCELLED)

    def inflight_for(self, sink: ReplySink) -> int:
        return self._per_scope.get(sink.scope, 0)

    def is_inflight(self, sink: ReplySink, rid: str) -> bool:
        return (sink.scope, rid) in self._inflight

    async def drain(self, timeout: float) -> int:
        """Refuse new work, let in-flight requests finish for up to `timeout` s, cancel the rest.

        Returns how many requests had to be cancelled.
        """
        self.accepting = False
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return 0
        except asyncio.TimeoutError:
            left = list(self._inflight.values())
            for entry in left:
                self._stop(entry, protocol.CANCELLED)
            if left:
                await asyncio.wait_for(self.idle.wait(), 5.0)
            return len(left)

    # --- internals ------------------------------------------------------------------------

    def _reply_error(self, sink: ReplySink, rid: Optional[str], code: str, message: str) -> None:
        event = protocol.error_event(rid, code, message)
        self.stats.record(event)
        if not sink.closed:
            sink.send(event)

    def _submit(self, req: Request, sink: ReplySink) -> None:
        key = (sink.scope, req.id)
        if key in self._inflight:
            self._reply_error(sink, req.id, protocol.BAD_REQUEST, "this id is already in flight")
            return
        if not self.accepting:
            self._reply_error(sink, req.id, protocol.BUSY, "shutting down; try another node")
            return
        if self._per_scope[sink.scope] >= sink.max_inflight:
            self._reply_error(
                sink, req.id, protocol.BUSY,
                f"more than {sink.max_inflight} requests in flight from this client",
            )  # fmt: skip
            return
        timeout_s = req.deadline_ms / 1000 if req.deadline_ms else self.cfg.engine.request_timeout_s
        deadline = time.monotonic() + timeout_s
        entry: Optional[_Inflight] = None

        def emit(event: Event) -> None:  # any thread
            self.loop.call_soon_threadsafe(self._deliver, entry, event)

        job = Job(req, emit, deadline)
        entry = _Inflight(job, sink)
        try:
            self.engine.submit(job)
        except EngineBusy:
            self._reply_error(
                sink, req.id, protocol.BUSY,
                f"queue full ({self.cfg.engine.queue_size} waiting); retry later",
            )  # fmt: skip
            return
        except EngineStopped:
            self._reply_error(sink, req.id, protocol.BUSY, "shutting down; try another node")
            return
        self._inflight[key] = entry
        self._per_scope[sink.scope] += 1
        self.idle.clear()
        entry.timer = self.loop.call_later(timeout_s, self._stop, entry, protocol.TIMEOUT)

    def _stop(self, entry: _Inflight, reason: str) -> None:
        if entry.finished:
            return
        if self.engine.cancel(entry.job, reason):  # never started: we answer it here
            what = "deadline passed while queued" if reason == protocol.TIMEOUT else "cancelled"
            self._deliver(entry, protocol.error_event(entry.job.request.id, reason, what))

    def _deliver(self, entry: Optional[_Inflight], event: Event) -> None:
        assert entry is not None
        if entry.finished:
            log.debug("dropping %s for finished request %s", event["event"], event.get("id"))
            return
        if event["event"] in FINAL_EVENTS:
            entry.finished = True
            if entry.timer:
                entry.timer.cancel()
            scope = entry.sink.scope
            self._inflight.pop((scope, entry.job.request.id), None)
            self._per_scope[scope] -= 1
            if self._per_scope[scope] <= 0:
                del self._per_scope[scope]
            self.stats.record(event)
            if not self._inflight:
                self.idle.set()
            if event["event"] == "error":
                log.info("%s %s: %s %s", entry.sink.peer, event["id"], event["code"],
                         event["message"])  # fmt: skip
            else:
                log.debug("%s %s: done, %s", entry.sink.peer, event["id"], event["usage"])
        if not entry.sink.closed:
            entry.sink.send(event)

    def _handle_op(self, op: Op, sink: ReplySink) -> None:
        if op.op == "status":
            sink.send(self.status())
        elif op.op == "cancel":
            assert op.id is not None
            entry = self._inflight.get((sink.scope, op.id))
            sink.send({"event": "cancel", "id": op.id, "found": entry is not None})
            if entry is not None:
                self._stop(entry, protocol.CANCELLED)
        elif op.op == "reset":
            assert op.session is not None
            found = self.engine.sessions.drop(op.session)
            sink.send({"event": "reset", "session": op.session, "found": found})

    def metrics(self) -> dict[str, Any]:
        """Status plus the box's health, for the periodic MQTT metrics message."""
        status = self.status()
        status.pop("event")
        load1, load5, load15 = os.getloadavg()
        status.update(
            {
                "ts": round(time.time(), 3),
                "cpu_percent": psutil.cpu_percent(interval=None),
                "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
                "cpu_temp_c": cpu_temperature(),
                "mem_available_mb": round(psutil.virtual_memory().available / 1e6, 1),
            }
        )
        return status

    def status(self) -> dict[str, Any]:
        eng, stats = self.engine, self.stats
        return {
            "event": "status",
            "node_id": self.cfg.node_id,
            "version": __version__,
            "state": "ready" if self.accepting else "stopping",
            "model": {
                "name": eng.model_name,
                "path": str(eng.model_file),
                "sha256": eng.model_sha256,
                "n_ctx": self.cfg.model.n_ctx,
                "threads": eng.n_threads,
                "load_s": round(eng.load_s, 3),
            },
            "queue_depth": eng.queue_depth,
            "queue_size": self.cfg.engine.queue_size,
            "in_flight": len(self._inflight),
            "generating": eng.busy,
            "sessions": len(eng.sessions),
            "session_kv_mb": round(eng.sessions.kv_bytes() / 1e6, 1),
            "uptime_s": round(time.monotonic() - stats.started, 1),
            "rss_mb": round(self._process.memory_info().rss / 1e6, 1),
            "requests_served": stats.served,
            "errors": dict(stats.errors),
            "ttft_ms_p50": percentile(stats.ttft_ms, 50),
            "ttft_ms_p95": percentile(stats.ttft_ms, 95),
            "tokens_per_s_p50": percentile(stats.tokens_per_s, 50),
            **{name: section() for name, section in self.status_sections.items()},
        }
