"""The MQTT front end for line equipment: requests in, streamed events out, availability, metrics.

paho's network thread only hands messages over to the event loop; everything else (parsing,
dispatch, coalescing, publishing) runs on the loop. Requests are acknowledged to the broker
(manual PUBACK) only once their final event has been accepted by the broker, so a request the
daemon took but had not answered when the broker or the daemon went away is delivered again
by the broker's persistent session, and duplicates of a request are answered once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import protocol
from edgeagent.config import Config, MqttConfig
from edgeagent.dispatcher import Dispatcher
from edgeagent.mqtt_client import (
    connect_failure,
    connect_properties,
    new_client,
    publish_properties,
    read_secret,
)
from edgeagent.protocol import FINAL_EVENTS, Event
from edgeagent.topics import Topics, reply_topic_problem

log = logging.getLogger("edgeagent.mqtt")

RECENT_REQUESTS = 10_000  # remembered to answer a redelivered request once
# A remembered request's RAM besides its key's parts: the key tuple, its _Delivery and its slot
# in the ordered map (about 250 bytes measured with tracemalloc on CPython 3.11).
RECENT_ENTRY_OVERHEAD = 256
# Room in a request's PUBLISH for the v5 properties edgeagent does not read (User Property,
# Content Type, Message Expiry, Subscription Identifier, ...).
UNREAD_PROPERTIES_BYTES = 4096
MAX_CORRELATION_BYTES = 65535  # MQTT's limit on Correlation Data
MQTT_MAX_PACKET = 1 + 4 + 268_435_455  # the largest packet MQTT can frame
PASSWORD_CREDENTIAL = "mqtt-password"  # noqa: S105 (a file name, not a secret)


def packet_size(topic: str, payload: bytes, qos: int, props: Optional[Properties], v5: bool) -> int:
    """Bytes of the PUBLISH packet paho sends: what a broker's Maximum Packet Size limits."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    if v5:
        remaining += len(props.pack()) if props is not None else 1
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining


@dataclass(frozen=True)
class NamedTopic:
    """A request topic `<prefix>/<node_id>/ask/<name>` from `[mqtt.schemas]` or `[mqtt.kb]`:
    it takes plain text too, and answers on `answer/<name>` a request naming no reply topic."""

    topic: str  # "ask/alarm"
    schema: Any  # the default `format` of its requests, or None
    kb: Union[bool, tuple[str, ...], None]  # the default `kb` of its requests, or None


def largest_request_packet(m: MqttConfig, topics: list[str]) -> int:
    """The Maximum Packet Size asked of a v5 broker: the largest PUBLISH that a request we read
    may arrive in, so that the broker drops anything larger instead of paho reading it whole
    before we refuse it. A request within our limits always fits: a payload of
    `max_payload_bytes` on the longest of `topics`, a Response Topic we would accept, the
    largest Correlation Data (echoed back, so a client may use all of it) and room for the
    properties we do not read. A Response Topic over our limit could only have been refused."""
    remaining = (
        2 + max(len(t.encode()) for t in topics) + 2  # topic name, packet id
        + 4  # properties length
        + 3 + m.max_reply_topic_bytes  # Response Topic
        + 3 + MAX_CORRELATION_BYTES  # Correlation Data
        + UNREAD_PROPERTIES_BYTES
        + m.max_payload_bytes
    )  # fmt: skip
    return min(1 + 4 + remaining, MQTT_MAX_PACKET)


def recent_entry_bytes(key: tuple[Any, ...]) -> int:
    """RAM a remembered request holds: its key's parts (reply topic, Correlation Data, id or
    payload hash) and the entry around them."""
    return RECENT_ENTRY_OVERHEAD + sum(sys.getsizeof(part) for part in key)


def plain_text(payload: bytes) -> str:
    """A plain-text question: UTF-8, not empty, no NUL (a ProtocolError says which)."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise protocol.ProtocolError(
            protocol.BAD_REQUEST, f"invalid UTF-8 at byte {exc.start}"
        ) from None
    if not text:
        raise protocol.ProtocolError(protocol.BAD_REQUEST, "an empty question")
    if "\x00" in text:
        raise protocol.ProtocolError(protocol.BAD_REQUEST, "a question holding NUL")
    return text


class _Delivery:
    """Where one inbound request came from and how to acknowledge it."""

    __slots__ = ("acked", "final_sent", "generation", "mid", "qos")

    def __init__(self, mid: int, qos: int, generation: int) -> None:
        self.mid, self.qos, self.generation = mid, qos, generation
        self.final_sent = False
        self.acked = False


class MqttReplySink:
    """A ReplySink publishing one request's events to its reply topic, tokens coalesced."""

    front_end = "mqtt"

    def __init__(
        self,
        link: MqttLink,
        topic: str,
        correlation: Optional[bytes],
        delivery: Optional[_Delivery],
    ) -> None:
        self.link, self.topic, self.correlation, self.delivery = link, topic, correlation, delivery
        self.question: Optional[str] = None  # a plain-text question, echoed in its final event
        self._pending: list[str] = []
        self._pending_id: Optional[str] = None
        self._flush_handle: Optional[asyncio.TimerHandle] = None
        self._last_flush = 0.0

    @property
    def peer(self) -> str:
        return f"mqtt:{self.topic}"

    @property
    def identity(self) -> str:
        # The reply topic is who the requester is: an ACL that lets each client read only its
        # own reply topics is what makes this an identity (docs/deploy.md).
        return f"mqtt:{self.topic}"

    @property
    def scope(self) -> Hashable:
        return ("mqtt", self.topic)

    @property
    def max_inflight(self) -> int:
        return self.link.cfg.mqtt.max_inflight_per_client

    @property
    def priority(self) -> int:
        return self.link.cfg.mqtt.priority

    @property
    def closed(self) -> bool:
        return False

    @property
    def reply_address(self) -> Optional[tuple[str, Optional[bytes]]]:
        return self.topic, self.correlation

    def send(self, event: Event) -> None:
        if event["event"] == "token":
            # Leading-edge throttle: the first token goes out at once (time to first token
            # matters most), later ones at most every token_interval_ms or token_batch tokens.
            self._pending.append(event["text"])
            self._pending_id = event["id"]
            m = self.link.cfg.mqtt
            interval = m.token_interval_ms / 1000
            now = time.monotonic()
            if len(self._pending) >= m.token_batch or now - self._last_flush >= interval:
                self._flush()
            elif self._flush_handle is None:
                self._flush_handle = self.link.loop.call_later(
                    self._last_flush + interval - now, self._flush
                )
            return
        self._flush()
        final = event["event"] in FINAL_EVENTS
        if final and self.question is not None:
            event = {**event, "question": self.question}
        qos = 1 if final else self.link.cfg.mqtt.qos
        mid = self.link.publish_reply(self.topic, event, self.correlation, qos)
        if final and self.delivery is not None:
            self.delivery.final_sent = True
            self.link.ack_after(mid, self.delivery, self.topic)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        self._last_flush = time.monotonic()
        text = "".join(self._pending)
        self._pending.clear()
        event = protocol.token_event(self._pending_id or "", text)
        self.link.publish_reply(self.topic, event, self.correlation, self.link.cfg.mqtt.qos)


class MqttLink:
    """The MQTT front end: requests from line equipment, answers on their reply topics
    (docs/mqtt.md)."""

    name = "mqtt"

    def __init__(
        self,
        cfg: Config,
        dispatcher: Dispatcher,
        loop: asyncio.AbstractEventLoop,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self.cfg, self.dispatcher, self.loop, self.describe = cfg, dispatcher, loop, describe
        m = cfg.mqtt
        schemas = {ts.topic: ts.schema for ts in m.schemas}
        kbs = {tk.topic: tk.kb for tk in m.kb}
        named = tuple(dict.fromkeys([*schemas, *(t for t in kbs if t != "ask")]))
        self.topics = Topics(m.topic_prefix, cfg.node_id, m.shared_group, named)
        # request topic -> what [mqtt.schemas] and [mqtt.kb] give it (docs/mqtt.md)
        self.named: dict[str, NamedTopic] = {
            self.topics.node_topic(t): NamedTopic(t, schemas.get(t), kbs.get(t)) for t in named
        }
        self.ask_kb = kbs.get("ask")  # `kb` of requests on the other request topics
        self.v5 = m.protocol == "5"
        self.client_id = m.client_id or f"edgeagent-{cfg.node_id}"
        self.connected = asyncio.Event()
        # The broker's Maximum Packet Size (MQTT v5 CONNACK): a larger publish gets us
        # disconnected, and paho would send it again after every reconnect.
        self.max_packet_size: Optional[int] = None
        self._generation = 0  # connection count: a message id is only valid on its connection
        self.accepting = True
        self.refused_subscriptions: list[str] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self._recent: collections.OrderedDict[tuple[Any, ...], _Delivery] = (
            collections.OrderedDict()
        )
        self._recent_bytes = 0  # bounded by redelivery_mb as _recent is by RECENT_REQUESTS
        # v3.1.1 has no way to tell the broker our limit: there the broker's own (mosquitto's
        # `max_packet_size`) is what keeps a huge message from being read whole.
        request_topics = [self.topics.ask, self.topics.ask_deep, self.topics.group_ask,
                          *self.named]  # fmt: skip
        self.max_packet_size_asked = largest_request_packet(m, request_topics) if self.v5 else None
        self._ack_on_puback: dict[int, _Delivery] = {}
        self._final_topics: dict[int, str] = {}  # QoS 1 finals awaiting PUBACK, for logs
        self._on_puback: dict[int, Callable[[], None]] = {}
        self.deep = cfg.escalation.enabled and cfg.escalation.deep_topic
        self._pending_subs: dict[int, list[str]] = {}
        self._connect_error = ""  # why the last attempt failed; logged once per reason
        self._metrics_task: Optional[asyncio.Task[None]] = None
        self._client = self._make_client()

    # --- set-up ---------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = new_client(
            self.client_id,
            v5=self.v5,
            manual_ack=True,
            username=m.username,
            password=read_secret(m.password_file, PASSWORD_CREDENTIAL, "mqtt.password_file")
            if m.username
            else None,
            tls=m.tls,
            reconnect=(m.reconnect_min_s, m.reconnect_max_s),
            logger=logging.getLogger("edgeagent.mqtt.paho"),
        )
        client.will_set(self.topics.status, self._offline_payload("connection lost"), 1, True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    async def start(self) -> None:
        """Connect in the background: a broker that is down delays nothing, we keep trying."""
        m = self.cfg.mqtt
        props = None
        if self.v5:
            props = connect_properties(
                m.session_expiry_s, max_packet_size=self.max_packet_size_asked or 0
            )
        self._client.connect_async(
            m.host, m.port, m.keepalive,
            clean_start=False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )  # fmt: skip
        self._client.loop_start()
        self._metrics_task = self.loop.create_task(self._publish_metrics())
        log.info(
            "MQTT %s connecting to %s:%d as %s; requests on %s",
            "v5" if self.v5 else "v3.1.1", m.host, m.port, self.client_id,
            " and ".join(self.topics.subscriptions(self.deep)),
        )  # fmt: skip

    async def close(self, timeout: float = 5.0) -> None:
        """Publish `offline` (retained), then disconnect cleanly (no Last Will)."""
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self._client.is_connected():
            info = self._client.publish(
                self.topics.status, self._offline_payload("shutdown"), 1, True
            )
            await self.loop.run_in_executor(None, info.wait_for_publish, timeout)
        self._client.disconnect()
        await self.loop.run_in_executor(None, self._client.loop_stop)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected.is_set(),
            "broker": f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
            "client_id": self.client_id,
            "subscriptions": self.topics.subscriptions(self.deep),
            "refused_subscriptions": self.refused_subscriptions,
            "connect_error": self._connect_error or None,
            "max_packet_size_asked": self.max_packet_size_asked,
            "redelivery_entries": len(self._recent),
            "redelivery_bytes": self._recent_bytes,
            **dict(self.counters),
        }

    async def stop_accepting(self) -> None:
        """From now on leave new requests unacknowledged at the broker, for our next start."""
        self.accepting = False

    def _offline_payload(self, reason: str) -> str:
        return json.dumps({"state": "offline", "node_id": self.cfg.node_id, "reason": reason})

    def _online_payload(self) -> str:
        return json.dumps(
            {
                "state": "online",
                "node_id": self.cfg.node_id,
                "since": round(time.time()),
                "ask_topic": self.topics.ask,
                **self._named_topics(),
                **self.describe(),
            }
        )

    def _named_topics(self) -> dict[str, list[str]]:
        """For the status: the topics with a schema, and those with a `kb` default."""
        out: dict[str, list[str]] = {}
        if self.ask_kb is not None:
            out["kb_topics"] = [self.topics.ask]
        for topic, named in self.named.items():
            if named.schema is not None:
                out.setdefault("schema_topics", []).append(topic)
            if named.kb is not None:
                out.setdefault("kb_topics", []).append(topic)
        return out

    # --- paho's network thread: hand over only --------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:  # fmt: skip
        max_packet = getattr(props, "MaximumPacketSize", None) if props else None
        self.loop.call_soon_threadsafe(self._connected, rc, bool(flags.session_present), max_packet)

    def _on_connect_fail(self, client: mqtt.Client, _u: Any) -> None:
        self.loop.call_soon_threadsafe(self._connect_failed, *connect_failure())

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any) -> None:  # fmt: skip
        self.loop.call_soon_threadsafe(self._disconnected, rc)

    def _on_subscribe(self, client: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode],
                      _p: Any) -> None:  # fmt: skip
        self.loop.call_soon_threadsafe(self._subscribed, mid, codes)

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any) -> None:  # fmt: skip
        self.loop.call_soon_threadsafe(self._published, mid, rc)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        self.loop.call_soon_threadsafe(
            self._inbound, msg.topic, bytes(msg.payload), response_topic, correlation,
            msg.mid, msg.qos, bool(msg.dup),
        )  # fmt: skip

    # --- event loop -----------------------------------------------------------------------

    def _connect_failed(self, level: int, reason: str) -> None:
        self.counters["connect_failed"] += 1
        if reason != self._connect_error:
            m = self.cfg.mqtt
            log.log(level, "MQTT cannot connect to %s:%d: %s; retrying", m.host, m.port, reason)
        self._connect_error = reason

    def _connected(self, rc: ReasonCode, session_present: bool,
                   max_packet: Optional[int] = None) -> None:  # fmt: skip
        if rc.is_failure:
            log.error("MQTT broker refused the connection: %s", rc.getName())
            self.counters["connect_refused"] += 1
            self._connect_error = f"refused by the broker: {rc.getName()}"
            return
        self._connect_error = ""
        self.max_packet_size = max_packet
        log.info("MQTT connected (session %s)", "resumed" if session_present else "new")
        self._generation += 1
        self.connected.set()
        topics = self.topics.subscriptions(self.deep)
        result, mid = self._client.subscribe([(t, self.cfg.mqtt.qos) for t in topics])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs[mid] = topics
        self._client.publish(self.topics.status, self._online_payload(), 1, True)

    def _disconnected(self, rc: ReasonCode) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.counters["disconnects"] += 1
            log.warning("MQTT connection lost (%s); reconnecting", rc.getName())

    def _subscribed(self, mid: int, codes: list[ReasonCode]) -> None:
        topics = self._pending_subs.pop(mid, [])
        refused = [t for t, c in zip(topics, codes) if c.is_failure]
        self.refused_subscriptions = refused
        for topic, code in zip(topics, codes):
            if code.is_failure:
                log.error("MQTT broker refused the subscription to %s: %s", topic, code.getName())

    def _published(self, mid: int, rc: ReasonCode) -> None:
        topic = self._final_topics.pop(mid, None)
        if rc.is_failure:
            self.counters["publish_refused"] += 1
            log.warning(
                "MQTT broker refused our publish to %s: %s",
                topic or f"(message {mid})", rc.getName(),
            )  # fmt: skip
        delivery = self._ack_on_puback.pop(mid, None)
        if delivery is not None:
            self._ack(delivery)
        callback = self._on_puback.pop(mid, None)
        if callback is not None and not rc.is_failure:
            callback()

    def ack_after(self, mid: Optional[int], delivery: _Delivery, topic: str) -> None:
        """Acknowledge the request once the broker has taken its final event (at once when
        that event could not be sent at all)."""
        if mid is None:
            self._ack(delivery)
            return
        self._ack_on_puback[mid] = delivery
        self._final_topics[mid] = topic

    def _ack(self, delivery: _Delivery) -> None:
        # A delivery from an earlier connection is not acknowledged: its message id may
        # name another message now. The broker delivers it again and we acknowledge that.
        if delivery.qos > 0 and not delivery.acked and delivery.generation == self._generation:
            delivery.acked = True
            self._client.ack(delivery.mid, delivery.qos)

    def publish_reply(self, topic: str, event: Event, correlation: Optional[bytes],
                      qos: int) -> Optional[int]:  # fmt: skip
        """Publish one event; its message id, or None when it is too large for the broker or
        its topic one a broker refuses."""
        problem = reply_topic_problem(topic)
        if problem is not None:
            # Requests are checked on the way in; this is for any other way a topic gets here
            # (a spooled escalation's): a publish the broker refuses costs the connection, and
            # paho would send it again after every reconnect.
            self.counters["replies_bad_topic"] += 1
            log.error("not publishing the %s event: its reply topic %s", event["event"], problem)
            return None
        props = publish_properties(correlation) if self.v5 else None
        payload = protocol.encode(event)[:-1]
        limit = self.max_packet_size
        if limit is not None and (size := packet_size(topic, payload, qos, props, self.v5)) > limit:
            self.counters["replies_too_large"] += 1
            log.warning(
                "dropping the %s event for %s: %d bytes with its reply topic and correlation data, "
                "over the broker's maximum packet size of %d", event["event"], topic[:100], size,
                limit,
            )  # fmt: skip
            return None
        info = self._client.publish(topic, payload, qos, False, props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("MQTT could not queue a reply to %s: %s", topic, mqtt.error_string(info.rc))
        return info.mid

    def publish_followup(self, topic: str, correlation: Optional[bytes], event: Event,
                         on_acked: Callable[[], None]) -> None:  # fmt: skip
        """A QoS 1 message outside any request (a cloud answer); `on_acked` once it is taken."""
        mid = self.publish_reply(topic, event, correlation, 1)
        if mid is None:
            return
        self._on_puback[mid] = on_acked
        self._final_topics[mid] = topic

    def _inbound(self, topic: str, payload: bytes, response_topic: Optional[str],
                 correlation: Optional[bytes], mid: int, qos: int, dup: bool) -> None:  # fmt: skip
        """One message from the broker. A failure nobody foresaw stays with that message: it
        is logged and counted, and the message acknowledged, so the broker does not deliver it
        again after every reconnect."""
        self.counters["received"] += 1
        delivery = _Delivery(mid, qos, self._generation)
        if not self.accepting:
            return  # unacknowledged: the broker keeps it for our next start
        try:
            self._read_request(topic, payload, response_topic, correlation, delivery, dup)
        except Exception:
            self.counters["inbound_errors"] += 1
            log.exception("unexpected failure reading a message on %s; dropped", topic)
            self._ack(delivery)

    def _read_request(self, topic: str, payload: bytes, response_topic: Optional[str],
                      correlation: Optional[bytes], delivery: _Delivery,
                      dup: bool) -> None:  # fmt: skip
        max_topic = self.cfg.mqtt.max_reply_topic_bytes
        # The Response Topic wins over `reply_to` (docs/mqtt.md). A request naming a reply topic
        # we may not publish to is refused on its other one when that is valid, else dropped.
        rt_problem = None
        if response_topic is not None:
            rt_problem = reply_topic_problem(response_topic, max_topic) or self._own(response_topic)
            if rt_problem is not None:
                rt_problem = f"the Response Topic {rt_problem}"
                self.counters["bad_reply_topic"] += 1
        reply_topic = response_topic if rt_problem is None else None
        named = self.named.get(topic)
        # A named topic's requests that name no reply topic are answered on its own.
        fallback = self.topics.default_reply(named.topic) if named is not None else None

        def reject(rid: Optional[str], message: str) -> None:
            to = reply_topic or fallback
            if to is None:
                # One line per message, never quoting the client's topic or payload.
                log.warning(
                    "dropping a request on %s with no way to reply: %s", topic,
                    rt_problem or message,
                )  # fmt: skip
                self.counters["dropped"] += 1
                self._ack(delivery)
                return
            # A refused message delivered again is refused once, like a request answered once.
            if self._redelivered(("refused", to, correlation,
                                  hashlib.sha256(payload).digest()), delivery, dup):  # fmt: skip
                return
            sink = MqttReplySink(self, to, correlation, delivery)
            self.dispatcher.stats.errors[protocol.BAD_REQUEST] += 1
            sink.send(protocol.error_event(rid, protocol.BAD_REQUEST, message))

        if len(payload) > self.cfg.mqtt.max_payload_bytes:
            limit = self.cfg.mqtt.max_payload_bytes
            reject(None, f"payload of {len(payload)} bytes is over the {limit}-byte limit")
            return
        text_key = None
        try:
            if named is not None and not payload.lstrip().startswith(b"{"):
                # Plain text on a named topic is the question itself, answered in one event.
                obj: Any = {"prompt": plain_text(payload), "stream": False}
                text_key = "text:" + hashlib.sha256(payload).hexdigest()
            else:
                obj = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            reject(None, exc.message)
            return
        if isinstance(obj, dict) and "op" not in obj:
            if (
                named is not None
                and named.schema is not None
                and not {"format", "grammar"} & set(obj)
            ):
                obj["format"] = named.schema
            # [mqtt.kb] "ask" is for every other request topic: ask, ask/deep, the group's ask,
            # except for a machine's structured questions (they use the manuals when they ask,
            # or on a named topic configured so).
            topic_kb = (
                named.kb if named is not None
                else None if {"format", "grammar"} & set(obj)
                else self.ask_kb
            )  # fmt: skip
            if topic_kb is not None and obj.get("kb") is None:
                obj["kb"] = list(topic_kb) if isinstance(topic_kb, tuple) else topic_kb
        if isinstance(obj, dict) and "reply_to" in obj:
            reply_to = obj.pop("reply_to")
            problem = reply_topic_problem(reply_to, max_topic) or self._own(reply_to)
            if problem is not None:
                if rt_problem is None:  # counted once per message
                    self.counters["bad_reply_topic"] += 1
                reject(protocol.request_id_of(obj), f"`reply_to` {problem}")
                return
            reply_topic = reply_topic or reply_to
        if rt_problem is not None:
            rid = protocol.request_id_of(obj) if isinstance(obj, dict) else None
            reject(rid, rt_problem)
            return
        reply_topic = reply_topic or fallback
        if reply_topic is None:
            reject(None, "no Response Topic property and no `reply_to` field")
            return
        if isinstance(obj, dict) and "op" not in obj and "id" not in obj:
            # MQTT v5 clients correlate by Correlation Data; the protocol still wants an id.
            obj["id"] = correlation.hex()[:64] if correlation else uuid.uuid4().hex
            if not correlation:  # a made-up id: a redelivery is known by its bytes
                text_key = text_key or "payload:" + hashlib.sha256(payload).hexdigest()
        # Only a valid id goes into the key: any other JSON value may be unhashable. Plain text
        # has no id of its own: a redelivery is known by its bytes.
        rid = text_key or (protocol.request_id_of(obj) if isinstance(obj, dict) else None)
        if self._redelivered((reply_topic, correlation, rid), delivery, dup):
            return
        sink = MqttReplySink(self, reply_topic, correlation, delivery)
        if text_key is not None and text_key.startswith("text:") and not correlation:
            # A plain-text question's answer carries it: a gateway with no Correlation Data
            # matches answers to questions by it (several may be on their way at once).
            sink.question = obj["prompt"]
        self.dispatcher.handle_decoded(obj, sink, via_deep_topic=topic == self.topics.ask_deep)
        if isinstance(obj, dict) and "op" in obj:
            self._ack(delivery)  # control ops are answered at once

    def _own(self, topic: str) -> Optional[str]:
        """Why a reply may not go to `topic`: one of this box's own topics (its status, a
        schema topic's answers, requests), where a client would speak as the box or as another
        client (a PLC reading answer/alarm cannot tell whose answer it got)."""
        own = f"{self.topics.prefix}/{self.topics.node_id}"
        if topic in (own, self.topics.group_ask) or topic.startswith(own + "/"):
            return f"is one of this box's own topics ({own}/...)"
        return None

    def _redelivered(self, key: tuple[Any, ...], delivery: _Delivery, dup: bool) -> bool:
        """True for a message the broker delivered again (we had not acknowledged it yet):
        it is acknowledged once its first answer is, never answered twice. Else remember it."""
        known = self._recent.get(key)
        if dup and known is not None:
            self.counters["duplicates"] += 1
            known.mid, known.qos, known.generation = delivery.mid, delivery.qos, delivery.generation
            known.acked = False
            if known.final_sent:
                self._ack(known)
            what = "a refused message" if key[0] == "refused" else f"request {key[-1]}"
            log.info("%s to %s delivered again; answering it once", what, key[-3])
            return True
        if known is None:
            self._recent_bytes += recent_entry_bytes(key)
        self._recent[key] = delivery
        # Bounded in bytes too: a key holds up to 64 KiB of Correlation Data.
        limit = self.cfg.mqtt.redelivery_mb << 20
        while len(self._recent) > RECENT_REQUESTS or self._recent_bytes > limit:
            old, _ = self._recent.popitem(last=False)
            self._recent_bytes -= recent_entry_bytes(old)
            self.counters["redelivery_evicted"] += 1
        return False

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.mqtt.metrics_interval_s)
            if self.connected.is_set():
                payload = json.dumps(self.dispatcher.metrics())
                self._client.publish(self.topics.metrics, payload, 0, False)
