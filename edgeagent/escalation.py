"""Escalation to the cloud model: the link to the cloud broker, the spool, follow-up answers.

The dispatcher decides what to escalate (policy.py) and hands it here. Every escalation is
written to the spool (fsync'd) before it leaves the box; waiting escalations are sent in order
whenever the link is up, which means the cloud broker is connected AND a cloud worker says it is
online; the answer streams to the request still waiting for it, or, when nobody waits any more,
goes out as a `cloud_answer` follow-up (MQTT reply topic, open terminal connection) and stays
retrievable with `{"op": "result"}`. The escalation id makes duplicates harmless on both sides.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import protocol
from edgeagent import spool as sp
from edgeagent.config import Config, state_dir
from edgeagent.mqtt_client import (
    connect_failure,
    connect_properties,
    new_client,
    publish_properties,
    read_secret,
)
from edgeagent.policy import Rules
from edgeagent.spool import Entry, EscalationSpool, QuotaExceeded
from edgeagent.structured import InvalidAnswer, answer_check, parse_answer
from edgeagent.topics import CloudTopics
from edgeagent.transport import ReplySink

log = logging.getLogger("edgeagent.escalation")

CLOUD_PASSWORD_CREDENTIAL = "cloud-password"  # noqa: S105 (a file name, not a secret)
MAINTENANCE_INTERVAL_S = 30.0
T = TypeVar("T")


class SpoolError(Exception):
    """An escalation could not be stored, so it was not accepted; the message says why."""


class CloudWaiter(Protocol):
    """A request waiting for its escalation's answer, as it streams."""

    def on_start(self) -> None: ...

    def on_token(self, text: str) -> None: ...

    def on_final(self, event: dict[str, Any]) -> None: ...


class FollowupPublisher(Protocol):
    def publish_followup(self, topic: str, correlation: Optional[bytes], event: dict[str, Any],
                         on_acked: Callable[[], None]) -> None: ...  # fmt: skip


class CloudLink:
    """The edge's client on the cloud broker: sends escalations, receives answers and workers'
    availability. paho's thread only hands over to the event loop."""

    def __init__(
        self,
        cfg: Config,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[bool], None],
        on_reply: Callable[[dict[str, Any], Optional[bytes]], None],
        on_worker_back: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.loop, self.on_change, self.on_reply = cfg, loop, on_change, on_reply
        self.on_worker_back = on_worker_back
        c = cfg.cloud
        self.topics = CloudTopics(c.topic_prefix)
        self.reply_topic = self.topics.reply(cfg.node_id)
        self.client_id = c.client_id or f"edgeagent-{cfg.node_id}-cloud"
        self.connected = False
        self.workers: dict[str, bool] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._client = new_client(
            self.client_id,
            username=c.username,
            password=read_secret(c.password_file, CLOUD_PASSWORD_CREDENTIAL, "cloud.password_file")
            if c.username
            else None,
            tls=c.tls,
            reconnect=(c.reconnect_min_s, c.reconnect_max_s),
            logger=logging.getLogger("edgeagent.escalation.paho"),
        )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._asks: dict[int, str] = {}  # message id -> escalation id, until the broker takes it
        self._connect_error = ""  # why the last attempt failed; logged once per reason

    @property
    def up(self) -> bool:
        return self.connected and any(self.workers.values())

    def start(self) -> None:
        c = self.cfg.cloud
        self._client.connect_async(
            c.host, c.port, c.keepalive, clean_start=False,
            properties=connect_properties(c.session_expiry_s),
        )  # fmt: skip
        self._client.loop_start()
        log.info("cloud link connecting to %s:%d as %s", c.host, c.port, self.client_id)

    async def stop(self) -> None:
        self._client.disconnect()
        await self.loop.run_in_executor(None, self._client.loop_stop)

    def status(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "connected": self.connected,
            "broker": f"{self.cfg.cloud.host}:{self.cfg.cloud.port}",
            "workers_online": sorted(w for w, online in self.workers.items() if online),
            "connect_error": self._connect_error or None,
            **dict(self.counters),
        }

    def publish_ask(self, esc_id: str, payload: dict[str, Any]) -> None:
        props = publish_properties(esc_id.encode(), self.reply_topic)
        info = self._client.publish(self.topics.ask, json.dumps(payload), 1, False, props)
        self._asks[info.mid] = esc_id

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.loop.call_soon_threadsafe(self._connected, rc)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.loop.call_soon_threadsafe(self._connect_failed, *connect_failure())

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any) -> None:  # fmt: skip
        self.loop.call_soon_threadsafe(self._disconnected, rc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any) -> None:  # fmt: skip
        self.loop.call_soon_threadsafe(self._published, mid, rc)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props else None
        self.loop.call_soon_threadsafe(
            self._message, msg.topic, bytes(msg.payload), correlation, bool(msg.retain)
        )

    def _connect_failed(self, level: int, reason: str) -> None:
        self.counters["connect_failed"] += 1
        if reason != self._connect_error:
            c = self.cfg.cloud
            log.log(level, "cannot connect to the cloud broker %s:%d: %s; retrying",
                    c.host, c.port, reason)  # fmt: skip
        self._connect_error = reason

    def _connected(self, rc: ReasonCode) -> None:
        if rc.is_failure:
            log.error("cloud broker refused the connection: %s", rc.getName())
            self.counters["connect_refused"] += 1
            self._connect_error = f"refused by the broker: {rc.getName()}"
            return
        self._connect_error = ""
        self.connected = True
        self._client.subscribe([(self.reply_topic, 1), (self.topics.worker_statuses, 1)])
        log.info("cloud broker connected; waiting for a worker's status")
        self.on_change(self.up)

    def _disconnected(self, rc: ReasonCode) -> None:
        if self.connected:
            self.counters["disconnects"] += 1
            log.warning("cloud broker connection lost (%s); reconnecting", rc.getName())
        self.connected = False
        self._asks.clear()  # a resent escalation is acknowledged under a new message id
        self.workers.clear()  # their retained statuses come again after we resubscribe
        self.on_change(False)

    def _published(self, mid: int, rc: ReasonCode) -> None:
        esc_id = self._asks.pop(mid, None)
        if esc_id is None or not rc.is_failure:
            return
        # Refused (an ACL): asking again would be refused again. The escalation fails like
        # one the cloud could not answer, so the request gets its local answer at once.
        self.counters["publish_refused"] += 1
        log.error("cloud broker refused escalation %s on %s: %s", esc_id, self.topics.ask,
                  rc.getName())  # fmt: skip
        message = f"the cloud broker refused the escalation: {rc.getName()}"
        event = protocol.error_event(None, protocol.CLOUD_ERROR, message)
        event["escalation_id"] = esc_id
        self.on_reply(event, None)

    def _message(self, topic: str, payload: bytes, correlation: Optional[bytes],
                 retained: bool = False) -> None:  # fmt: skip
        try:
            obj = json.loads(payload) if payload else {}
        except ValueError:
            log.warning("cloud: ignoring a message on %s that is not JSON", topic)
            return
        if topic == self.reply_topic:
            if isinstance(obj, dict):
                self.on_reply(obj, correlation)
            return
        parts = topic.split("/")
        if len(parts) >= 3 and parts[-1] == "status":
            was = self.up
            online = isinstance(obj, dict) and obj.get("state") == "online"
            self.workers[parts[-2]] = online
            if self.up != was:
                log.info("cloud link %s (workers online: %s)", "up" if self.up else "down",
                         ", ".join(self.status()["workers_online"]) or "none")  # fmt: skip
                self.on_change(self.up)
            elif online and not retained and was:
                # A worker said `online` just now: it has (re)connected. After a cloud broker
                # restart its retained `online` may have made the link look up before it was
                # back, and what was sent meanwhile may never reach it.
                self.counters["worker_returns"] += 1
                self.on_worker_back()


def _answer_fits(event: dict[str, Any], limit: int) -> bool:
    """A cloud `done` carries its answer as a string of at most `limit` UTF-8 bytes."""
    text = event.get("text", "")
    return isinstance(text, str) and len(text.encode(errors="replace")) <= limit


def _cloud_fields(event: dict[str, Any]) -> dict[str, Any]:
    """What of a cloud worker's final event is kept and passed on, each field of its type and
    within a bound: a worker is another machine, and its answer goes into the spool and to
    requesters."""
    out: dict[str, Any] = {}
    for key, bound in (("text", None), ("model", 200), ("finish_reason", 32), ("code", 32),
                       ("message", 1000)):  # fmt: skip
        value = event.get(key)
        if isinstance(value, str):
            out[key] = value if bound is None else value[:bound]
    usage = event.get("usage")
    if isinstance(usage, dict):
        out["usage"] = {
            str(k)[:40]: v
            for k, v in list(usage.items())[:16]
            if isinstance(v, int) and not isinstance(v, bool)
        }
    return out


def default_spool_path() -> Path:
    return state_dir() / "escalations.sqlite"


def followup_event(entry: Entry) -> dict[str, Any]:
    """What a requester gets when an escalation ends after its request was answered."""
    event: dict[str, Any] = {
        "event": "cloud_answer",
        "id": entry.request_id,
        "escalation_id": entry.id,
        "status": entry.state,
        "escalation": entry.reason,
    }
    answer = entry.answer or {}
    if entry.state == sp.ANSWERED:
        event.update(
            source="cloud",
            text=answer.get("text", ""),
            **{k: answer[k] for k in ("model", "finish_reason", "usage", "json") if k in answer},
        )
    elif entry.state == sp.FAILED:
        event["error"] = {"code": answer.get("code"), "message": answer.get("message")}
        if "text" in answer:  # an answer refused as `invalid`
            event["error"]["text"] = answer["text"]
    else:
        event["error"] = {
            "code": entry.state,
            "message": {
                sp.DROPPED: "dropped from a full spool before the cloud could answer",
                sp.EXPIRED: "the cloud stayed unreachable longer than the spool keeps questions",
                sp.CANCELLED: "cancelled by the requester",
            }.get(entry.state, entry.state),
        }
    return event


class Escalator:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.loop = cfg, loop
        self.rules = Rules.from_config(cfg.escalation)
        e = cfg.escalation
        self.spool = EscalationSpool(
            Path(e.spool_path) if e.spool_path else default_spool_path(),
            max_waiting=e.spool_max, max_age_s=e.spool_max_age_s, result_ttl_s=e.result_ttl_s,
            max_bytes=e.spool_mb << 20, client_max=e.client_spool_max,
            client_bytes=e.client_spool_mb << 20,
        )  # fmt: skip
        # One thread owns the sqlite connection: fsyncs never block the event loop.
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ea-spool")
        self.link = CloudLink(cfg, loop, self._link_changed, self._reply, self._worker_back)
        self.followups: Optional[FollowupPublisher] = None  # the MQTT front end, when enabled
        self.counters: collections.Counter[str] = collections.Counter()
        self.spool_counts: dict[str, int] = {}
        # sent on the current link, not answered yet: id -> when it was (last) sent
        self._inflight: dict[str, float] = {}
        self._heard: set[str] = set()  # in flight, and a worker has started on it
        self._streamed: dict[str, int] = {}  # bytes of cloud tokens taken per escalation
        self._waiters: dict[str, CloudWaiter] = {}
        self._terminals: dict[str, ReplySink] = {}  # open connections waiting for a follow-up
        self._pumping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def up(self) -> bool:
        return self.link.up

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._maintain()
        self.link.start()
        self._spawn(self._maintenance())

    async def redeliver(self) -> None:
        """Outcomes that a crash or restart kept from their MQTT requesters go out again."""
        for entry in await self._db(self.spool.undelivered):
            self._deliver_followup(entry)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.link.stop()
        await self._db(self.spool.close)
        self._db_thread.shutdown()

    def status(self) -> dict[str, Any]:
        return {
            "link": self.link.status(),
            "in_flight": len(self._inflight),
            "spool": self.spool_counts,
            **dict(self.counters),
        }

    # --- for the dispatcher -------------------------------------------------------------------

    async def record(
        self,
        esc_id: str,
        request_id: str,
        reason: dict[str, Any],
        payload: dict[str, Any],
        reply_address: Optional[tuple[str, Optional[bytes]]],
        client: str,
    ) -> Entry:
        """Store an escalation durably (or find it, when it was stored before) and return it.

        Raises QuotaExceeded when `client` has its share of the spool waiting, SpoolError when
        the spool cannot take it (disk full, I/O error).
        """
        topic, correlation = reply_address or (None, None)
        try:
            entry, created, dropped = await self._db(
                self.spool.add, esc_id, request_id, reason, payload, topic, correlation, client
            )
        except QuotaExceeded:
            self.counters["refused_quota"] += 1
            raise
        except sqlite3.Error as exc:
            self.counters["spool_errors"] += 1
            raise SpoolError(
                f"the escalation spool {self.spool.path} could not store the question: {exc}"
            ) from None
        for old in dropped:
            log.warning("spool full (%d): dropped escalation %s", self.cfg.escalation.spool_max,
                        old.id)  # fmt: skip
            self._deliver_followup(old)
        if created:
            self.counters["recorded"] += 1
            self.pump()
        else:
            self.counters["recorded_before"] += 1
        return dataclasses.replace(entry, new=created)

    def ask(self, entry: Entry, waiter: CloudWaiter) -> None:
        """Send now (the link is up) and stream the answer to `waiter`."""
        self._waiters[entry.id] = waiter
        if entry.id not in self._inflight:
            self._send(entry)

    def detach(self, esc_id: str, sink: ReplySink) -> None:
        """The request stops waiting (it was answered locally): the answer becomes a follow-up."""
        self._waiters.pop(esc_id, None)
        self._streamed.pop(esc_id, None)
        self.watch(esc_id, sink)

    def watch(self, esc_id: str, sink: ReplySink) -> None:
        """An open terminal connection gets the follow-up directly (MQTT has its reply topic)."""
        if sink.reply_address is None:
            self._terminals[esc_id] = sink

    def cancel(self, esc_id: str) -> None:
        self._waiters.pop(esc_id, None)
        self._streamed.pop(esc_id, None)
        self._terminals.pop(esc_id, None)
        self._spawn(self._db(self.spool.finish, esc_id, sp.CANCELLED))

    async def result(self, key: str, client: str) -> dict[str, Any]:
        """`{"op": "result"}`: one of `client`'s escalations, by escalation or request id.

        Another client's escalation is `unknown`, exactly like one that never existed.
        """
        entry = await self._db(self.spool.find, key, client)
        if entry is None:
            return {"event": "result", "id": key, "status": "unknown"}
        event = followup_event(entry)
        event.update(event="result", id=key, request_id=entry.request_id)
        if entry.state == sp.WAITING:
            event["status"] = "queued"
        elif not entry.delivered:
            await self._db(self.spool.mark_delivered, entry.id)
        return event

    def pump(self) -> None:
        """Send waiting escalations, oldest first, keeping at most max_inflight on the link."""
        if self.link.up and not self._pumping:
            self._pumping = True
            self._spawn(self._pump())

    # --- internals ------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            result = fn(*args)
            if fn != self.spool.close:  # a bound method: a new object on every access
                self.spool_counts = self.spool.counts()
            return result

        return await self.loop.run_in_executor(self._db_thread, call)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("escalation task failed", exc_info=task.exception())

    async def _pump(self) -> None:
        try:
            window = self.cfg.escalation.max_inflight
            while self.link.up and len(self._inflight) < window:
                entries = await self._db(
                    self.spool.waiting, window - len(self._inflight), frozenset(self._inflight)
                )
                if not entries:
                    break
                for entry in entries:
                    if entry.id not in self._inflight:
                        self._send(entry)
        finally:
            self._pumping = False

    def _send(self, entry: Entry) -> None:
        self._inflight[entry.id] = time.monotonic()
        self.counters["sent"] += 1
        self.link.publish_ask(entry.id, {**entry.payload, "escalation_id": entry.id})

    def _link_changed(self, up: bool) -> None:
        # A new link starts from the spool: what was sent before may never have arrived (a
        # broker restarted without persistence). Sending again is harmless: duplicates of an
        # escalation id are answered once by the worker and recorded once here.
        self._inflight.clear()
        self._heard.clear()
        if up:
            self.pump()

    def _worker_back(self) -> None:
        """A worker has just (re)connected: what is in flight and no worker has started on
        goes out again (it may have been sent while no worker was there to take it)."""
        silent = [esc_id for esc_id in self._inflight if esc_id not in self._heard]
        for esc_id in silent:
            del self._inflight[esc_id]
        if silent:
            log.info("a worker is back; asking again %d escalation(s) nobody started on",
                     len(silent))  # fmt: skip
            self.counters["resent_on_worker_return"] += len(silent)
        self.pump()

    def _reply(self, event: dict[str, Any], correlation: Optional[bytes]) -> None:
        esc_id = event.get("escalation_id")
        if not isinstance(esc_id, str):
            esc_id = correlation.decode(errors="replace") if correlation else ""
        kind = event.get("event")
        if kind in ("start", "token") and esc_id in self._inflight:
            self._inflight[esc_id] = time.monotonic()  # being answered: not one to ask again
            self._heard.add(esc_id)
        limit = self.cfg.escalation.max_answer_bytes
        if kind == "start":
            self._streamed.pop(esc_id, None)
            waiter = self._waiters.get(esc_id)
            if waiter is not None:
                waiter.on_start()
        elif kind == "token":
            text = event.get("text")
            waiter = self._waiters.get(esc_id)
            if waiter is None or not isinstance(text, str):
                return
            taken = self._streamed.get(esc_id, 0) + len(text.encode(errors="replace"))
            # Past the bound nothing more is passed on (the `done` is refused too, below, and
            # the local answer voids what was streamed).
            self._streamed[esc_id] = taken
            if taken <= limit:
                waiter.on_token(text)
        elif kind in ("done", "error"):
            self._streamed.pop(esc_id, None)
            if kind == "done" and not _answer_fits(event, limit):
                self.counters["answers_refused"] += 1
                log.warning("escalation %s: the cloud's answer is not text of at most %d bytes; "
                            "refused", esc_id, limit)  # fmt: skip
                message = f"the cloud's answer was not text of at most {limit} bytes"
                event = protocol.error_event(None, protocol.CLOUD_ERROR, message)
            self._spawn(self._finished(esc_id, event))

    async def _finished(self, esc_id: str, event: dict[str, Any]) -> None:
        state = sp.ANSWERED if event["event"] == "done" else sp.FAILED
        answer = _cloud_fields(event)
        if state == sp.FAILED:
            # A worker's error is a cloud_error, with no text: only the edge's own check
            # (below) says `invalid` and keeps the refused answer's text.
            answer.pop("text", None)
            answer["code"] = protocol.CLOUD_ERROR
        if state == sp.ANSWERED:
            answer = await self._db(self._in_shape, esc_id, answer)
            if "code" in answer:
                state = sp.FAILED
                self.counters["answers_invalid"] += 1
                log.warning("escalation %s: %s", esc_id, answer["message"])
                event = {"event": "error", **answer}
        changed = await self._db(self.spool.finish, esc_id, state, answer)
        self._inflight.pop(esc_id, None)
        self._heard.discard(esc_id)
        self.pump()
        if not changed:
            self.counters["duplicate_answers"] += 1
            log.info("escalation %s answered again; the first answer stands", esc_id)
            return
        self.counters[state] += 1
        waiter = self._waiters.pop(esc_id, None)
        if waiter is not None:
            self._terminals.pop(esc_id, None)
            waiter.on_final({"event": event["event"], **answer})
            await self._db(self.spool.mark_delivered, esc_id)
            return
        entry = await self._db(self.spool.get, esc_id)
        if entry is not None:
            self._deliver_followup(entry)

    def _deliver_followup(self, entry: Entry) -> None:
        event = followup_event(entry)
        sink = self._terminals.pop(entry.id, None)
        if sink is not None and not sink.closed:
            sink.send(event)
            self._spawn(self._db(self.spool.mark_delivered, entry.id))
        elif entry.reply_topic and self.followups is not None:
            self.followups.publish_followup(
                entry.reply_topic, entry.correlation, event,
                lambda: self._spawn(self._db(self.spool.mark_delivered, entry.id)),
            )  # fmt: skip
        self.counters["followups"] += 1

    def _in_shape(self, esc_id: str, answer: dict[str, Any]) -> dict[str, Any]:
        """The cloud's answer to a question asked with a `format`, checked like a local one:
        with its value as `json`, or as an `invalid` error saying why (spool thread)."""
        entry = self.spool.get(esc_id)
        fmt = entry.payload.get("format") if entry and entry.state == sp.WAITING else None
        if fmt is None:
            return answer
        try:
            value = parse_answer(answer_check(fmt), answer.get("text", ""))
        except (ValueError, RecursionError) as exc:  # InvalidAnswer is a ValueError
            if isinstance(exc, InvalidAnswer):
                why = str(exc)[:300]
            elif answer.get("finish_reason") == "length":
                why = "max_tokens cut it before its JSON was complete"
            else:
                why = "it is not complete JSON"
            message = f"the cloud's answer does not have the shape asked for: {why}"
            # Its text is kept (within max_answer_bytes): `result` shows what the cloud said.
            return {"code": protocol.INVALID, "message": message, "text": answer.get("text", "")}
        return {**answer, "json": value}

    async def _maintain(self) -> None:
        for entry in await self._db(self.spool.expire):
            log.warning("escalation %s expired in the spool", entry.id)
            self._deliver_followup(entry)

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(min(MAINTENANCE_INTERVAL_S, self.cfg.escalation.resend_s / 2))
            try:
                await self._maintain()
                await self._resend_unanswered()
            except Exception:  # an I/O error on the spool: expiry and resends go on next time
                log.exception("escalation maintenance failed")
            self.pump()

    async def _resend_unanswered(self) -> None:
        """Ask again what was sent resend_s ago on a link that stayed up and got no answer.

        The broker acknowledged it, but an answer can still go missing between worker and
        edge (a worker that died after its broker forgot the escalation, an answer published
        while we were resubscribing). Whatever the worker streams for it (start, tokens)
        restarts the clock, and the edge records one answer per escalation id, so asking
        again costs at most a second run in the cloud.
        """
        if not self.link.up:
            return
        stale = time.monotonic() - self.cfg.escalation.resend_s
        old = [(esc_id, sent) for esc_id, sent in self._inflight.items() if sent <= stale]
        for esc_id, sent in old:
            entry = await self._db(self.spool.get, esc_id)
            if self._inflight.get(esc_id) != sent or not self.link.up:
                continue  # answered, re-sent by a reconnect, or the link went down meanwhile
            if entry is None or entry.state != sp.WAITING:
                self._inflight.pop(esc_id, None)
                continue
            self.counters["resent"] += 1
            log.info("escalation %s unanswered for %.0f s; asking again", esc_id,
                     self.cfg.escalation.resend_s)  # fmt: skip
            self._send(entry)
