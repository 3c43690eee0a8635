"""The asyncio hub: turns inbound requests into engine jobs and events back to reply sinks.

This is the one place where exceptions become `error` events, and where the rule "every
accepted request gets exactly one final event carrying its id" is enforced.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from edgeagent import __version__, kb, policy, protocol
from edgeagent import spool as sp
from edgeagent.config import Config, format_limits
from edgeagent.engine import Engine, EngineBusy, EngineStopped
from edgeagent.escalation import Escalator, SpoolError
from edgeagent.job import Job
from edgeagent.metrics import Metrics
from edgeagent.protocol import FINAL_EVENTS, Event, Op, ProtocolError, Request
from edgeagent.transport import ReplySink

log = logging.getLogger("edgeagent.dispatcher")

# After a shutdown's cancel, how long the engine gets to answer before the dispatcher does.
CANCEL_GRACE_S = 1.0


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


@dataclasses.dataclass(frozen=True)
class _Grounding:
    """A question answered from the manuals: the passages shown (`citations`, also in `done`)
    and, once the model is asked, the messages as asked (what its session keeps), the
    messages the cloud may see (without the passages of private collections), and whether a
    private passage was read (the session's turn is then private)."""

    citations: list[dict[str, Any]]
    asked: Optional[tuple[dict[str, str], ...]] = None
    cloud: Optional[tuple[dict[str, str], ...]] = None
    private: bool = False


class _Inflight:
    """One accepted request until its final event: answered locally, by the cloud, or both."""

    __slots__ = (
        "cloud_started", "cloud_streamed", "cloud_timer", "deadline", "esc_id", "escalation",
        "finished", "grounding", "job", "request", "sink", "timer",
    )  # fmt: skip

    def __init__(self, request: Request, sink: ReplySink, deadline: float) -> None:
        self.request, self.sink, self.deadline = request, sink, deadline
        self.job: Optional[Job] = None  # set once the local model is asked
        self.timer: Optional[asyncio.TimerHandle] = None
        self.finished = False
        self.escalation: Optional[dict[str, Any]] = None  # goes into `done` as "escalation"
        self.esc_id: Optional[str] = None
        self.cloud_timer: Optional[asyncio.TimerHandle] = None
        self.cloud_started = 0.0
        self.cloud_streamed = False  # cloud tokens went to the requester
        self.grounding: Optional[_Grounding] = None  # answered from the manuals


def escalation_id(node_id: str, sink: ReplySink, req: Request) -> str:
    """Stable for an MQTT request delivered again (same reply address, id and question), so a
    redelivery finds its escalation instead of asking the cloud twice; random otherwise."""
    address = sink.reply_address
    if address is None:
        return os.urandom(12).hex()
    topic, correlation = address
    parts: list[Any] = [node_id, topic, (correlation or b"").hex(), req.id, req.messages]
    if req.constraint is not None:  # the same question with another schema is another one
        parts.append([req.constraint.kind, req.constraint.schema])
    key = json.dumps(parts)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def not_stored(entry: _Inflight, reason: policy.Reason, exc: Exception) -> dict[str, Any]:
    """The `escalation` of a request whose question the spool did not take: `refused` when its
    client has its share waiting, `error` when the spool could not store it (disk full, I/O
    error); the message says which, in one log line without a traceback."""
    if isinstance(exc, sp.QuotaExceeded):
        log.warning("escalating %s from %s refused: %s", entry.request.id, entry.sink.peer, exc)
        status = "refused"
    else:
        log.error("escalating %s failed: %s", entry.request.id, exc)
        status = "error"
    return {**reason.as_dict(), "status": status, "message": str(exc)}


class _CloudWaiter:
    """Streams an escalation's cloud answer into its request."""

    def __init__(self, dispatcher: Dispatcher, entry: _Inflight) -> None:
        self.d, self.entry = dispatcher, entry

    def on_start(self) -> None:
        self.d._cloud_restart(self.entry)

    def on_token(self, text: str) -> None:
        self.d._cloud_token(self.entry, text)

    def on_final(self, event: dict[str, Any]) -> None:
        self.d._cloud_final(self.entry, event)


class Dispatcher:
    def __init__(self, cfg: Config, engine: Engine, loop: asyncio.AbstractEventLoop,
                 embedder: Optional[kb.Embedder] = None) -> None:  # fmt: skip
        self.cfg, self.engine, self.loop = cfg, engine, loop
        self.stats = Stats()
        self.accepting = True
        self.stopping = False
        self._inflight: dict[tuple[Hashable, str], _Inflight] = {}
        self._per_scope: collections.Counter[Hashable] = collections.Counter()
        self._results_pending: collections.Counter[Hashable] = collections.Counter()
        self._process = psutil.Process(os.getpid())
        self.idle = asyncio.Event()
        self.idle.set()
        # Transports add their own section to status (e.g. "mqtt": connection state).
        self.status_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self.escalator: Optional[Escalator] = None
        self.prometheus: Optional[Metrics] = None  # /metrics, where the HTTP front end runs
        # The knowledge base: one thread owns its read-only connection.
        self._kb = kb.Reader(Path(cfg.kb.path) if cfg.kb.path else kb.default_kb_path(), embedder)
        self._kb_pending = 0  # searches waiting for the kb thread (a question's vector takes time)
        # What the box holds (kb.Reader.info), kept by the kb thread for status and /metrics.
        self.kb_info: dict[str, Any] = {**kb.Reader.EMPTY, "path": str(self._kb.path)}
        self._kb_info_queued = False
        self._kb_search_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self._kb_searches = 0
        self._kb_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ea-kb")
        self.refresh_kb_info()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- entry points for transports (event loop only) ------------------------------------

    def handle_payload(self, payload: bytes, sink: ReplySink) -> None:
        """A raw line/payload from a transport: decode, validate, act; errors become events."""
        try:
            obj = protocol.decode(payload)
        except ProtocolError as exc:
            self._reply_error(sink, exc.request_id, exc.code, exc.message)
            return
        self.handle_decoded(obj, sink)

    def handle_decoded(self, obj: Any, sink: ReplySink, via_deep_topic: bool = False) -> None:
        """An already decoded JSON value (MQTT strips its transport fields first)."""
        try:
            msg = protocol.parse(obj, max_tokens_limit=self.cfg.model.max_tokens,
                                 limits=format_limits(self.cfg.engine))  # fmt: skip
            constraint = msg.constraint if isinstance(msg, Request) else None
            if constraint and constraint.kind == "grammar" and not self.cfg.engine.allow_grammar:
                raise ProtocolError(
                    protocol.BAD_REQUEST, "`grammar` is off on this box ([engine] allow_grammar); "
                    "`format` with a JSON Schema is taken", msg.id,
                )  # fmt: skip
            self.handle(msg, sink, via_deep_topic)
        except ProtocolError as exc:
            self._reply_error(sink, exc.request_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("unexpected failure handling a request from %s", sink.peer)
            self._reply_error(sink, None, protocol.INTERNAL, f"internal error: {exc}")

    def handle(self, msg: Request | Op, sink: ReplySink, via_deep_topic: bool = False) -> None:
        if isinstance(msg, Op):
            self._handle_op(msg, sink)
        else:
            self._submit(msg, sink, via_deep_topic)

    def sink_closed(self, sink: ReplySink) -> None:
        """The client went away: stop everything it asked for."""
        for entry in [e for e in self._inflight.values() if e.sink is sink]:
            self._stop(entry, protocol.CANCELLED)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def inflight_for(self, sink: ReplySink) -> int:
        return self._per_scope.get(sink.scope, 0)

    def is_inflight(self, sink: ReplySink, rid: str) -> bool:
        return (sink.scope, rid) in self._inflight

    async def drain(self, timeout: float, grace: float = 0.0) -> int:
        """Let in-flight requests finish for up to `timeout` s, cancel the rest.

        The transports have stopped taking new clients (a restart's terminals wait in the
        socket's backlog for the next instance). For the first `grace` s, requests on
        connections already open are still taken: a terminal accepted just before the stop
        has sent its line, but it was read after, and refusing it would lose a restart's
        request. Later requests get `busy`. Returns how many requests had to be cancelled.
        """
        self.stopping = True
        deadline = self.loop.time() + timeout
        try:
            if min(grace, timeout) > 0:
                await asyncio.sleep(min(grace, timeout))
        finally:
            self.accepting = False
        left: list[_Inflight] = []
        if not self.idle.is_set():
            try:
                await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                left = list(self._inflight.values())
        if not left:
            return 0
        for entry in left:
            self._stop(entry, protocol.CANCELLED, shutdown=True)
        try:
            await asyncio.wait_for(self.idle.wait(), CANCEL_GRACE_S)
        except asyncio.TimeoutError:
            # The engine stops a request between decode steps, not inside one llama.cpp call (a
            # prompt batch on a slow or busy box): answer what is still running here, so every
            # request still gets its final event before the connections close.
            stuck = list(self._inflight.values())
            log.warning("%d request(s) still running after the cancel; answering them now",
                        len(stuck))  # fmt: skip
            for entry in stuck:
                message = "cancelled: the daemon is stopping"
                self._deliver(
                    entry, protocol.error_event(entry.request.id, protocol.CANCELLED, message)
                )
        return len(left)

    # --- internals ------------------------------------------------------------------------

    def _reply_error(self, sink: ReplySink, rid: Optional[str], code: str, message: str) -> None:
        event = protocol.error_event(rid, code, message)
        self._count(event, sink)
        if not sink.closed:
            sink.send(event)

    def _submit(self, req: Request, sink: ReplySink, via_deep_topic: bool = False) -> None:
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
        reason = None
        esc = self.escalator
        if esc is not None:
            reason = policy.before_answer(
                req, esc.rules, via_deep_topic=via_deep_topic, count_tokens=self.engine.count_tokens
            )
        timeout_s = req.deadline_ms / 1000 if req.deadline_ms else self.cfg.engine.request_timeout_s
        entry = _Inflight(req, sink, time.monotonic() + timeout_s)
        collections = self._kb_collections(req, sink)
        # Answer locally; with a low-confidence rule, the answer may get a second opinion.
        if (
            reason is None
            and collections is None
            and not self._ask_local(entry, self._want_confidence(req), registered=False)
        ):
            return
        self._inflight[key] = entry
        self._per_scope[sink.scope] += 1
        self.idle.clear()
        entry.timer = self.loop.call_later(timeout_s, self._stop, entry, protocol.TIMEOUT)
        if collections is not None:
            self._spawn(self._ground(entry, collections, reason))
        elif reason is not None:
            self._spawn(self._escalate(entry, reason))

    def _want_confidence(self, req: Request) -> bool:
        esc = self.escalator
        return esc is not None and esc.rules.low_confidence and policy.may_leave_the_box(req)

    # --- the manuals ------------------------------------------------------------------------

    def _kb_collections(self, req: Request, sink: ReplySink) -> Optional[tuple[str, ...]]:
        """The collections a request's answer comes from (empty: all), None for no `kb`."""
        if req.kb is None and req.constraint is not None:
            return None  # a machine's structured question uses the manuals only when it asks
        wanted = req.kb if req.kb is not None else sink.front_end in self.cfg.kb.front_ends
        if wanted is False:
            return None
        return () if wanted is True else tuple(wanted)

    def _kb_search(self, entry: _Inflight, question: str,
                   collections: tuple[str, ...]) -> list[kb.Hit]:  # fmt: skip
        """The passages for a question (on the kb thread, which owns the connection)."""
        if entry.finished:  # cancelled or past its deadline while it waited for the thread
            return []
        try:
            return self._kb.search(question, self.cfg.kb.top_k, collections or None)
        finally:
            self._kb_info()

    def _kb_info(self) -> None:
        """On the kb thread: what the box holds now (a damaged file: zeros and the error;
        its searches report it)."""
        try:
            self.kb_info = self._kb.info()
        except Exception as exc:
            log.debug("reading the knowledge base's size failed", exc_info=True)
            self.kb_info = {**kb.Reader.EMPTY, "path": str(self._kb.path), "error": str(exc)}
        finally:
            self._kb_info_queued = False

    def refresh_kb_info(self) -> None:
        """Have the kb thread look at the file again (after the start, at each status and
        scrape): one such look waits at a time, and none beside a full queue of searches."""
        if self._kb_info_queued or self._kb_pending >= self.cfg.engine.queue_size:
            return
        self._kb_info_queued = True
        try:
            self._kb_thread.submit(self._kb_info)
        except RuntimeError:  # the thread is gone: the daemon stops
            self._kb_info_queued = False

    def kb_status(self) -> dict[str, Any]:
        self.refresh_kb_info()  # seen by the next status: a `kb add` shows without a question
        return {
            **self.kb_info,
            "searches": self._kb_searches,
            "search_ms_p50": percentile(self._kb_search_ms, 50),
            "search_ms_p95": percentile(self._kb_search_ms, 95),
            "waiting": self._kb_pending,
        }

    def close(self) -> None:
        """After the drain: the knowledge base's thread and connection."""
        # Not cancel_futures: that would cancel the close too. What is queued is quick (a
        # search of a finished request returns at once).
        self._kb_thread.submit(self._kb.close)
        self._kb_thread.shutdown(wait=True)

    async def _ground(self, entry: _Inflight, collections: tuple[str, ...],
                      reason: Optional[policy.Reason]) -> None:  # fmt: skip
        """Find the passages, send them as `citations` before the first token, and ask with
        them; when none comes close enough, answer that the manuals do not cover it."""
        req = entry.request
        question = req.messages[-1]["content"]
        started = time.monotonic()
        if self._kb_pending >= self.cfg.engine.queue_size:
            waiting = self._kb_pending
            self._deliver(entry, protocol.error_event(
                req.id, protocol.BUSY, f"{waiting} searches of the manuals waiting; retry later"
            ))  # fmt: skip
            return
        self._kb_pending += 1
        try:
            hits = await self.loop.run_in_executor(
                self._kb_thread, self._kb_search, entry, question, collections
            )
        except kb.KbError as exc:
            self._deliver(entry, protocol.error_event(req.id, protocol.BAD_REQUEST, f"`kb`: {exc}"))
            return
        except Exception as exc:  # a damaged file: this request's error, logged
            log.exception("searching the knowledge base for %s failed", req.id)
            self._deliver(entry, protocol.error_event(req.id, protocol.INTERNAL, f"kb: {exc}"))
            return
        finally:
            self._kb_pending -= 1
        if entry.finished:
            return
        k = self.cfg.kb
        cites = kb.citations(hits)
        entry.grounding = _Grounding(cites)
        search_ms = round((time.monotonic() - started) * 1000, 1)
        self._kb_searches += 1
        self._kb_search_ms.append(search_ms)
        self._deliver(entry, {"event": "citations", "id": req.id, "citations": cites,
                              "search_ms": search_ms})  # fmt: skip
        # Not covered when no passage holds enough of the question's words (a passage the
        # vectors found may come first and hold none of them).
        if not hits or max(h.matched for h in hits) < k.min_match:
            if req.constraint is not None:
                # A machine waiting for JSON of a shape gets no prose in its place.
                self._deliver(entry, protocol.error_event(req.id, protocol.NOT_COVERED,
                                                          k.not_covered))  # fmt: skip
                return
            done = protocol.done_event(
                req.id, k.not_covered, source="kb", node_id=self.cfg.node_id,
                finish_reason="not_covered",
            )  # fmt: skip
            if req.stream:
                self._deliver(entry, protocol.token_event(req.id, k.not_covered))
            self._deliver(entry, done)
            return
        # As many of the passages, best first, as fit in half the context the answer leaves.
        room = (self.cfg.model.n_ctx - (req.max_tokens or self.cfg.model.max_tokens)) // 2
        numbered = list(enumerate(kb.fitting(hits, room), start=1))
        asked = {"role": "user", "content": kb.grounded_question(numbered, question)}
        entry.request = dataclasses.replace(req, messages=(*req.messages[:-1], asked))
        # Passages of private collections never leave the box; the others keep their numbers.
        shared = [(n, h) for n, h in numbered if h.collection not in k.private]
        entry.grounding = _Grounding(
            cites,
            asked=req.messages,
            cloud=(*req.messages[:-1],
                   {"role": "user", "content": kb.grounded_question(shared, question)}),
            private=len(shared) < len(numbered),
        )  # fmt: skip
        if reason is None:
            self._ask_local(entry, self._want_confidence(req))
        else:
            await self._escalate(entry, reason)

    def _ask_local(self, entry: _Inflight, want_confidence: bool = False,
                   registered: bool = True, spooled: bool = False) -> bool:  # fmt: skip
        """Queue the request for the local model; False (and the client told) when it can't.

        `spooled`: the question also waits in the escalation spool, so a full local queue
        is not a refusal: the requester gets the `queued` answer and the cloud's follow-up.
        """

        def emit(event: Event) -> None:  # any thread
            self.loop.call_soon_threadsafe(self._deliver, entry, event)

        req, sink = entry.request, entry.sink
        # The local answer's tokens must join up to `done.text` on their own.
        self._void_cloud_tokens(entry, "the cloud answer broke off")
        priority = sink.priority if req.priority is None else req.priority
        job = Job(req, emit, entry.deadline, client=sink.scope, priority=priority,
                  owner=sink.identity)  # fmt: skip
        job.want_confidence = want_confidence
        if entry.grounding is not None:
            job.remember, job.private_turn = entry.grounding.asked, entry.grounding.private
        try:
            self.engine.submit(job)
        except (EngineBusy, EngineStopped) as exc:
            message = (
                f"queue full ({self.cfg.engine.queue_size} waiting); retry later"
                if isinstance(exc, EngineBusy)
                else "shutting down; try another node"
            )
            if spooled and isinstance(exc, EngineBusy) and entry.escalation is not None:
                entry.escalation["local"] = "busy"
                self._deliver(entry, self._queued_done(entry))
                return False
            event = protocol.error_event(entry.request.id, protocol.BUSY, message)
            if registered:
                self._deliver(entry, event)
            else:
                self._reply_error(entry.sink, entry.request.id, protocol.BUSY, message)
            return False
        entry.job = job
        return True

    # --- escalation -----------------------------------------------------------------------

    async def _escalate(self, entry: _Inflight, reason: policy.Reason) -> None:
        esc, req = self.escalator, entry.request
        assert esc is not None
        offline = self.cfg.escalation.offline
        try:
            if not esc.up and offline == "local":
                entry.escalation = {**reason.as_dict(), "status": "offline"}
                self._ask_local(entry)
                return
            stored = await esc.record(
                escalation_id(self.cfg.node_id, entry.sink, req), req.id, reason.as_dict(),
                self._cloud_payload(entry, reason), entry.sink.reply_address,
                entry.sink.identity,
            )  # fmt: skip
        except (sp.QuotaExceeded, SpoolError) as exc:  # the local model answers instead
            entry.escalation = not_stored(entry, reason, exc)
            if not entry.finished:  # not cancelled while the spool was looking
                self._ask_local(entry)
            return
        except Exception as exc:
            log.exception("escalating %s failed", req.id)
            self._deliver(entry, protocol.error_event(req.id, protocol.INTERNAL, str(exc)))
            return
        entry.esc_id = stored.id
        entry.escalation = {**reason.as_dict(), "id": stored.id}
        if entry.finished:  # cancelled or timed out while the spool was writing
            esc.cancel(stored.id)
            return
        if stored.state == sp.ANSWERED and stored.answer is not None:
            self._cloud_final(entry, {"event": "done", **stored.answer})  # asked before
            return
        if esc.up and stored.state == sp.WAITING and stored.new:
            entry.cloud_started = time.monotonic()
            entry.cloud_timer = self.loop.call_later(
                self.cfg.escalation.timeout_s, self._cloud_timeout, entry
            )
            esc.ask(stored, _CloudWaiter(self, entry))
            return
        entry.escalation["status"] = "queued"
        esc.watch(stored.id, entry.sink)
        if not stored.new:
            # Asked before (an MQTT request the broker delivered again after a restart, its
            # acknowledgement lost with the old process): the answer goes to the reply address
            # stored with it, as the one `cloud_answer` the requester was promised.
            self._deliver(entry, self._queued_done(entry))
        elif offline == "queue":
            self._deliver(entry, self._queued_done(entry))
        else:
            self._ask_local(entry, spooled=True)

    def _cloud_payload(self, entry: _Inflight, reason: policy.Reason,
                       answered: str | None = None) -> dict[str, Any]:  # fmt: skip
        """What goes to the cloud: the conversation so far, less its private turns, redacted;
        a grounded question with the passages that may leave the box.

        `answered`: the local answer of a request asked again as a second opinion; the
        session already holds that turn, which is the question asked, not history.
        """
        assert self.escalator is not None
        req, sink = entry.request, entry.sink
        g = entry.grounding
        asked = list(g.cloud if g is not None and g.cloud is not None else req.messages)
        history = self.engine.shareable_history(sink.identity, req.session)
        own = g.asked if g is not None and g.asked is not None else req.messages
        turn = [*own, {"role": "assistant", "content": answered}]
        if answered is not None and history[-len(turn) :] == turn:
            history = history[: -len(turn)]
        system = self.cfg.model.system_prompt
        has_system = any(m["role"] == "system" for m in [*history, *asked])
        messages = [{"role": "system", "content": system}] if system and not has_system else []
        messages += [*history, *asked]
        return {
            "node_id": self.cfg.node_id,
            "request_id": req.id,
            "messages": policy.redact_messages(messages, self.escalator.rules),
            "max_tokens": req.max_tokens or self.cfg.escalation.max_tokens,
            **({"temperature": req.temperature} if req.temperature is not None else {}),
            **self._cloud_format(req, self.escalator.rules),
            "reason": reason.as_dict(),
        }

    @staticmethod
    def _cloud_format(req: Request, rules: policy.Rules) -> dict[str, Any]:
        """The `format` the cloud's answer must have too (a raw grammar never leaves),
        redacted like the messages."""
        c = req.constraint
        if c is None or c.kind == "grammar":
            return {}
        return {"format": "json" if c.kind == "json" else policy.redact_value(c.schema, rules)}

    def _queued_done(self, entry: _Inflight) -> Event:
        return protocol.done_event(entry.request.id, "", source="queued",
                                   node_id=self.cfg.node_id, finish_reason="queued")  # fmt: skip

    def _cloud_restart(self, entry: _Inflight) -> None:
        """The cloud starts (again) on this answer: tokens it streamed before are void."""
        if entry.finished or entry.job is not None:
            return
        self._void_cloud_tokens(entry, "the cloud restarted its answer")

    def _void_cloud_tokens(self, entry: _Inflight, reason: str) -> None:
        """Cloud tokens already streamed to the requester are void: tell it with `restart`."""
        if entry.cloud_streamed:
            entry.cloud_streamed = False
            self._deliver(entry, protocol.restart_event(entry.request.id, reason))

    def _cloud_token(self, entry: _Inflight, text: str) -> None:
        if entry.finished or entry.job is not None:
            return
        if entry.cloud_timer is not None:  # the timeout is for silence, not for a long answer
            entry.cloud_timer.cancel()
            entry.cloud_timer = self.loop.call_later(
                self.cfg.escalation.timeout_s, self._cloud_timeout, entry
            )
        if entry.request.stream:
            entry.cloud_streamed = True
            self._deliver(entry, protocol.token_event(entry.request.id, text))

    def _cloud_final(self, entry: _Inflight, event: dict[str, Any]) -> None:
        if entry.cloud_timer is not None:
            entry.cloud_timer.cancel()
        if entry.finished or entry.job is not None:
            return
        req = entry.request
        assert entry.escalation is not None
        if event.get("event") != "done":
            log.warning("escalation %s failed in the cloud: %s", entry.esc_id, event.get("message"))
            # `invalid`: the cloud answered, but not in the shape asked for (escalation.py
            # checked it); the local model's constrained answer stands in.
            status = "invalid" if event.get("code") == protocol.INVALID else "cloud_error"
            entry.escalation.update(status=status, message=event.get("message", ""))
            self._ask_local(entry)
            return
        text = event.get("text", "")
        g = entry.grounding
        asked = g.asked if g is not None and g.asked is not None else req.messages
        self.engine.record_turn(entry.sink.identity, req.session, asked, text)
        now = time.monotonic()
        entry.escalation["status"] = "answered"
        started = entry.cloud_started or now
        self._deliver(
            entry,
            protocol.done_event(
                req.id,
                text,
                source="cloud",
                node_id=self.cfg.node_id,
                finish_reason=event.get("finish_reason", "stop"),
                model=event.get("model", ""),
                **({"session": req.session} if req.session else {}),
                usage=event.get("usage", {}),
                timings={"total_ms": round((now - started) * 1000, 1)},
                **({"json": event["json"]} if "json" in event else {}),
            ),
        )

    def _cloud_timeout(self, entry: _Inflight) -> None:
        if entry.finished or entry.job is not None or self.escalator is None:
            return
        assert entry.esc_id is not None and entry.escalation is not None
        log.info("escalation %s: no cloud answer within %.1f s; answering locally",
                 entry.esc_id, self.cfg.escalation.timeout_s)  # fmt: skip
        self.escalator.detach(entry.esc_id, entry.sink)
        entry.escalation["status"] = "timeout"
        self._ask_local(entry, spooled=True)

    async def _second_opinion(self, entry: _Inflight, event: Event, reason: policy.Reason) -> None:
        """A local answer the model was unsure of: deliver it, and ask the cloud as well."""
        esc, req = self.escalator, entry.request
        assert esc is not None
        try:
            stored = await esc.record(
                escalation_id(self.cfg.node_id, entry.sink, req), req.id, reason.as_dict(),
                self._cloud_payload(entry, reason, event.get("text", "")),
                entry.sink.reply_address, entry.sink.identity,
            )  # fmt: skip
            esc.watch(stored.id, entry.sink)
            event["escalation"] = {**reason.as_dict(), "id": stored.id, "status": "queued"}
        except (sp.QuotaExceeded, SpoolError) as exc:
            event["escalation"] = not_stored(entry, reason, exc)
        except Exception:
            log.exception("second opinion for %s could not be recorded", req.id)
            event["escalation"] = {**reason.as_dict(), "status": "error"}
        self._complete(entry, event)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- finishing --------------------------------------------------------------------------

    def _stop(self, entry: _Inflight, reason: str, shutdown: bool = False) -> None:
        if entry.finished:
            return
        if entry.job is None:  # waiting for the cloud (or the spool): answer here
            if entry.esc_id is not None and self.escalator is not None:
                # Only the requester cancels a question; a shutdown leaves it in the spool.
                if reason == protocol.CANCELLED and not shutdown:
                    self.escalator.cancel(entry.esc_id)
                else:
                    self.escalator.detach(entry.esc_id, entry.sink)
            if entry.cloud_timer is not None:
                entry.cloud_timer.cancel()
            what = "deadline passed" if reason == protocol.TIMEOUT else "cancelled"
            self._deliver(entry, protocol.error_event(entry.request.id, reason, what))
        elif self.engine.cancel(entry.job, reason):  # never started: we answer it here
            what = "deadline passed while queued" if reason == protocol.TIMEOUT else "cancelled"
            self._deliver(entry, protocol.error_event(entry.request.id, reason, what))

    def _deliver(self, entry: Optional[_Inflight], event: Event) -> None:
        assert entry is not None
        if entry.finished:
            log.debug("dropping %s for finished request %s", event["event"], event.get("id"))
            return
        if event["event"] not in FINAL_EVENTS:
            if not entry.sink.closed:
                entry.sink.send(event)
            return
        entry.finished = True
        if entry.timer:
            entry.timer.cancel()
        if event["event"] == "done" and entry.grounding is not None:
            event["citations"] = entry.grounding.citations
        if event["event"] == "done" and entry.escalation is not None:
            event["escalation"] = entry.escalation
        elif event["event"] == "done" and entry.job is not None and entry.job.want_confidence:
            assert self.escalator is not None
            confidence = event.get("confidence", {}).get("mean_logprob")
            reason = policy.after_answer(entry.request, self.escalator.rules, confidence)
            if reason is not None:
                self._spawn(self._second_opinion(entry, event, reason))
                return
        self._complete(entry, event)

    def _complete(self, entry: _Inflight, event: Event) -> None:
        """Send the final event and forget the request."""
        scope = entry.sink.scope
        self._inflight.pop((scope, entry.request.id), None)
        self._per_scope[scope] -= 1
        if self._per_scope[scope] <= 0:
            del self._per_scope[scope]
        self._count(event, entry.sink)
        if not self._inflight:
            self.idle.set()
        if event["event"] == "error":
            log.info("%s %s: %s %s", entry.sink.peer, event["id"], event["code"],
                     event["message"])  # fmt: skip
        else:
            log.debug("%s %s: done, %s", entry.sink.peer, event["id"], event.get("usage"))
        if not entry.sink.closed:
            entry.sink.send(event)

    def _count(self, event: Event, sink: ReplySink) -> None:
        self.stats.record(event)
        if self.prometheus is not None:
            try:
                self.prometheus.record(event, sink.front_end)
            except Exception:  # a count lost, never the answer
                log.exception("counting %s for /metrics failed", event.get("event"))

    def gauges(self) -> dict[str, tuple[str, float]]:
        """What /metrics reads at each scrape besides the counters: plain attributes and
        counts, nothing that waits on the inference thread."""
        eng = self.engine
        out: dict[str, tuple[str, float]] = {
            "edgeagent_ready": ("1 while the daemon takes requests", float(self.accepting)),
            "edgeagent_queue_depth": ("Requests waiting for a slot", eng.queue_depth),
            "edgeagent_slots": ("Slots: requests decoded together", eng.parallel),
            "edgeagent_slots_busy": ("Slots generating an answer", eng.active),
            "edgeagent_requests_in_flight": (
                "Requests accepted, not answered yet",
                len(self._inflight),
            ),
            "edgeagent_sessions": ("Conversations kept for follow-ups", len(eng.sessions)),
            "edgeagent_kb_documents": (
                "Manuals in the knowledge base (as last read)",
                self.kb_info.get("documents", 0),
            ),
            "edgeagent_kb_passages": (
                "Passages in the knowledge base (as last read)",
                self.kb_info.get("passages", 0),
            ),
        }
        self.refresh_kb_info()
        mqtt = self.status_sections.get("mqtt")
        if mqtt is not None:
            connected = float(bool(mqtt().get("connected")))
            out["edgeagent_mqtt_connected"] = ("1 while connected to the line's broker", connected)
        if self.escalator is not None:
            esc = self.escalator
            out["edgeagent_cloud_link_up"] = ("1 while a cloud worker is reachable", float(esc.up))
            waiting = esc.spool_counts.get("waiting", 0)
            out["edgeagent_spool_waiting"] = (
                "Escalations waiting in the spool for the cloud",
                waiting,
            )
        return out

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
            found = self.engine.sessions.drop(sink.identity, op.session)
            sink.send({"event": "reset", "session": op.session, "found": found})
        elif op.op == "result":
            assert op.id is not None
            # A spool lookup each: as many at once per client as it may have requests.
            if self._results_pending[sink.scope] >= sink.max_inflight:
                self._reply_error(sink, op.id, protocol.BUSY,
                                  f"more than {sink.max_inflight} result ops pending")  # fmt: skip
                return
            self._results_pending[sink.scope] += 1
            self._spawn(self._result(op.id, sink))

    async def _result(self, key: str, sink: ReplySink) -> None:
        try:
            if self.escalator is None:
                event: Event = {"event": "result", "id": key, "status": "unknown"}
            else:
                try:
                    event = await self.escalator.result(key, sink.identity)
                except Exception as exc:
                    log.exception("result %s", key)
                    event = protocol.error_event(key, protocol.INTERNAL, str(exc))
        finally:
            self._results_pending[sink.scope] -= 1
            if self._results_pending[sink.scope] <= 0:
                del self._results_pending[sink.scope]
        if not sink.closed:
            sink.send(event)

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
            "state": "stopping" if self.stopping else "ready",
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
            "slots": eng.slots_status(),
            "sessions": len(eng.sessions),
            "session_kv_mb": round(eng.sessions.kv_bytes() / 1e6, 1),
            "kb": self.kb_status(),
            "uptime_s": round(time.monotonic() - stats.started, 1),
            "rss_mb": round(self._process.memory_info().rss / 1e6, 1),
            "requests_served": stats.served,
            "errors": dict(stats.errors),
            "ttft_ms_p50": percentile(stats.ttft_ms, 50),
            "ttft_ms_p95": percentile(stats.ttft_ms, 95),
            "tokens_per_s_p50": percentile(stats.tokens_per_s, 50),
            **{name: section() for name, section in self.status_sections.items()},
        }
