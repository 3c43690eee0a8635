"""The cloud worker: answers edge nodes' escalations with an OpenAI-compatible model server.

`edgeagent cloud-worker --config FILE` runs next to vLLM or TGI. It takes escalations from a
shared subscription on the cloud broker (several workers split the load), streams each chat
completion back to the asking node's reply topic, and acknowledges an escalation to the broker
only after its final reply, so one that a dying worker had not finished goes to another worker.
A duplicate of an escalation id is answered once: replayed when done, ignored while running.

Whoever can publish on `<cloud>/ask` is not trusted: a reply goes only to `<cloud>/reply/<node_id>`
of the node that asked, answers are remembered per (node, escalation id), the model server's
API key goes to `base_url` only (no redirect is followed), and an answer is bounded in bytes
and in time however the model server behaves.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import reprlib
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from typing import IO, Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import __version__, protocol
from edgeagent.config import NODE_ID_RE, Config
from edgeagent.mqtt_client import connect_properties, new_client, publish_properties, read_secret
from edgeagent.systemd import Notifier
from edgeagent.topics import CloudTopics

log = logging.getLogger("edgeagent.worker")

API_KEY_ENV = "EDGEAGENT_CLOUD_API_KEY"
API_KEY_CREDENTIAL = "cloud-api-key"
RECENT_ANSWERS = 10_000  # answers kept to replay to a duplicate, and at most ...
RECENT_ANSWER_BYTES = 64 << 20  # ... this much text (answers can be max_answer_bytes each)
PUBLISH_TIMEOUT_S = 30.0
# One server-sent event line: a token's delta in JSON is far below this, so a longer line is a
# model server gone wrong, not an answer to wait for.
MAX_SSE_LINE_BYTES = 1 << 20
# An escalation's JSON Schema: the edge's own bound ([engine] format_max_bytes) is at most 64 KiB.
MAX_FORMAT_BYTES = 1 << 20
READ_BYTES = 64 << 10

# (node id, escalation id): what the worker remembers an escalation by, so one node can neither
# read nor plant another node's answer by reusing its escalation id.
EscalationKey = tuple[str, str]

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80


class EscalationError(Exception):
    """An escalation the worker cannot accept (bad payload)."""


def parse_escalation(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        raise EscalationError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EscalationError("an escalation must be a JSON object")
    esc_id = obj.get("escalation_id")
    if not isinstance(esc_id, str) or not 0 < len(esc_id) <= 128:
        raise EscalationError("`escalation_id` must be a non-empty string")
    messages = obj.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and m.get("role") in protocol.ROLES
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise EscalationError("`messages` must be a non-empty list of {role, content}")
    for key in ("max_tokens",):
        if key in obj and (not isinstance(obj[key], int) or isinstance(obj[key], bool)
                           or obj[key] < 1):  # fmt: skip
            raise EscalationError(f"`{key}` must be a positive integer")
    if "temperature" in obj and not isinstance(obj["temperature"], (int, float)):
        raise EscalationError("`temperature` must be a number")
    if "format" in obj:
        fmt = obj["format"]
        if fmt != "json" and not (
            isinstance(fmt, dict)
            and len(json.dumps(fmt, separators=(",", ":"))) <= MAX_FORMAT_BYTES
        ):
            raise EscalationError(
                f'`format` must be "json" or a JSON Schema object of at most {MAX_FORMAT_BYTES} '
                "bytes"
            )
    return obj


def response_format(fmt: Any, style: str) -> Optional[dict[str, Any]]:
    """An escalation's `format` as the model server's `response_format` ([worker]
    response_format): OpenAI's `json_schema` (vLLM, llama-server), TGI's `json_object` with the
    schema as `value`, llama-cpp-python's `json_object` with the schema as `schema`; "off"
    sends none (the edge still checks the answer)."""
    if fmt is None or style == "off":
        return None
    if fmt == "json":  # any object; TGI wants a schema for it
        fmt = {"type": "object"} if style == "tgi" else None
        if fmt is None:
            return {"type": "json_object"}
    if style == "tgi":
        return {"type": "json_object", "value": fmt}
    if style == "llama-cpp":
        return {"type": "json_object", "schema": fmt}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": fmt, "strict": True}}


def shown(value: object) -> str:
    """`value` for a log line: repr'd (no raw control characters) and cut short, because it comes
    from whoever published the escalation."""
    return _SHOWN.repr(value)


def reply_node(topics: CloudTopics, reply: Optional[str]) -> Optional[str]:
    """The node id a Response Topic answers, when it is exactly `CloudTopics.reply(node_id)` with
    a valid node id; else None. Any other topic (a worker's status, another tree) is refused:
    the worker would otherwise publish wherever an escalation tells it to."""
    head = topics.reply("")
    if not reply or not reply.startswith(head):
        return None
    node = reply[len(head) :]
    return node if NODE_ID_RE.fullmatch(node) and topics.reply(node) == reply else None


def sse_data(resp: Any, deadline: float) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream. `read1` returns after one receive, so
    the deadline is checked after every read: a line iterator would wait for a newline that a
    server dripping bytes never sends, each byte resetting the socket timeout. (A read begun just
    before the deadline may still wait out the socket timeout: the answer ends within twice
    request_timeout_s.) A line longer than MAX_SSE_LINE_BYTES is an error (ValueError), a
    stream still going at the deadline too (TimeoutError)."""
    buf = bytearray()
    while True:
        chunk = resp.read1(READ_BYTES)
        if time.monotonic() > deadline:
            raise TimeoutError("no complete answer in time")
        start = len(buf)
        buf += chunk
        lines = []
        while (end := buf.find(b"\n", start)) >= 0:
            lines.append(bytes(buf[:end]))
            del buf[: end + 1]
            start = 0
        if not chunk and buf:  # the last line, without its newline
            lines.append(bytes(buf))
        for raw in lines:
            if len(raw) > MAX_SSE_LINE_BYTES:
                raise ValueError(f"an event line longer than {MAX_SSE_LINE_BYTES} bytes")
            line = raw.decode("utf-8", errors="replace").strip()
            if line.startswith("data:"):
                yield line[5:].strip()
        if not chunk:
            return
        if len(buf) > MAX_SSE_LINE_BYTES:
            raise ValueError(f"an event line longer than {MAX_SSE_LINE_BYTES} bytes")


class Answer:
    """A streamed chat completion as it comes in: its text, cut at `limit` UTF-8 bytes (on a
    character boundary), and what has not been forwarded to the edge yet."""

    def __init__(self, limit: int, model: str) -> None:
        self.limit, self.model = limit, model
        self.parts: list[str] = []
        self.pending: list[str] = []
        self.size = 0
        self.full = False
        self.finish = "stop"
        self.usage: dict[str, Any] = {}
        self.first_at: Optional[float] = None

    def take(self, chunk: object) -> None:
        """Add one `chat.completion.chunk`; a chunk of the wrong shape is a ValueError, so the
        final event carries a str text and no stray types."""
        if not isinstance(chunk, dict):
            raise ValueError("a stream chunk that is not a JSON object")
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise ValueError("a stream chunk whose `choices` is not a list")
        for choice in choices:
            delta = (choice.get("delta") or {}) if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise ValueError("a stream choice without a `delta` object")
            text = delta.get("content")
            if text is not None and not isinstance(text, str):
                raise ValueError("a stream chunk whose delta is not text")
            if text and not self.full:
                self._add(text)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish and not self.full:
                self.finish = finish

    def _add(self, text: str) -> None:
        data = text.encode()
        room = self.limit - self.size
        if len(data) > room:
            text = data[:room].decode("utf-8", errors="ignore")
            self.full, self.finish = True, "length"
            data = text.encode()
        if text:
            self.parts.append(text)
            self.pending.append(text)
            self.size += len(data)
            self.first_at = self.first_at or time.monotonic()


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib would send the request again, the API key's Authorization
    header included, to whatever host a Location names. The 3xx surfaces as an HTTPError."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> None:  # fmt: skip
        return None


def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> None:
    """Wait until the broker has taken a QoS 1 message. Published while disconnected, it waits
    in paho's queue and goes out after the reconnect: nothing to wait for now (paho's own wait
    raises then, which left an answered escalation marked running forever)."""
    if info.rc == mqtt.MQTT_ERR_SUCCESS:
        info.wait_for_publish(timeout)


class CloudWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        w, c = cfg.worker, cfg.cloud
        self.worker_id = w.worker_id or socket.gethostname().split(".")[0]
        self.topics = CloudTopics(c.topic_prefix)
        self.status_topic = self.topics.worker_status(self.worker_id)
        self.api_key = os.environ.get(API_KEY_ENV) or read_secret(
            w.api_key_file, API_KEY_CREDENTIAL, "worker.api_key_file"
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            w.concurrency, thread_name_prefix="ea-completion"
        )
        self._lock = threading.Lock()
        self._generation = 0
        # key -> [(mid, qos, generation), ...]: the first delivery and any duplicate of it
        self._running: dict[EscalationKey, list[tuple[int, int, int]]] = {}
        # key -> reply addresses of duplicates that came while it ran: answered too, because
        # the first answer may have gone out while the asker was not subscribed (a broker
        # restarted without persistence) and the duplicate is the asker asking again.
        self._again: dict[EscalationKey, list[tuple[str, Optional[bytes]]]] = {}
        self._answered: collections.OrderedDict[EscalationKey, dict[str, Any]] = (
            collections.OrderedDict()
        )
        self._answered_bytes = 0
        self.counters: collections.Counter[str] = collections.Counter()  # under _lock
        self._opener = urllib.request.build_opener(RefuseRedirects)
        self._stop = threading.Event()
        self.client = new_client(
            c.client_id or f"edgeagent-worker-{self.worker_id}",
            manual_ack=True,
            username=c.username,
            password=read_secret(c.password_file, "cloud-password", "cloud.password_file")
            if c.username
            else None,
            tls=c.tls,
            reconnect=(c.reconnect_min_s, c.reconnect_max_s),
            logger=logging.getLogger("edgeagent.worker.paho"),
        )
        self.client.will_set(self.status_topic, self._status("offline", "connection lost"), 1, True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _status(self, state: str, reason: str = "") -> str:
        w = self.cfg.worker
        return json.dumps(
            {
                "state": state,
                "worker_id": self.worker_id,
                "version": __version__,
                "model": w.model,
                "concurrency": w.concurrency,
                **({"reason": reason} if reason else {}),
            }
        )

    # --- paho's thread ------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("cloud broker refused the connection: %s", rc.getName())
            return
        with self._lock:
            self._generation += 1
        topic = self.topics.shared_ask(self.cfg.worker.shared_group)
        client.subscribe(topic, 1)
        client.publish(self.status_topic, self._status("online"), 1, True)
        log.info("connected; taking escalations from %s", topic)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        reply = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        with self._lock:
            generation = self._generation
        # The broker sends at most `concurrency` unacknowledged escalations (Receive Maximum),
        # so this queue stays bounded by it.
        self._pool.submit(
            self._handle, bytes(msg.payload), reply, correlation, msg.mid, msg.qos, generation
        )

    # --- completion threads -----------------------------------------------------------------

    def _handle(self, payload: bytes, reply: Optional[str], correlation: Optional[bytes],
                mid: int, qos: int, generation: int) -> None:  # fmt: skip
        try:
            self._handle_one(payload, reply, correlation, (mid, qos, generation))
        except Exception:
            log.exception("escalation handling failed")
            self._ack([(mid, qos, generation)])

    def _handle_one(self, payload: bytes, reply: Optional[str], correlation: Optional[bytes],
                    delivery: tuple[int, int, int]) -> None:  # fmt: skip
        node = reply_node(self.topics, reply)
        if reply is None or node is None:
            wanted = self.topics.reply("<node_id>")
            self._refuse(f"its Response Topic {shown(reply)} is not {wanted}", delivery)
            return
        try:
            esc = parse_escalation(payload)
        except EscalationError as exc:
            # No answer: its escalation id could only come from the Correlation Data, which
            # anyone may set to another escalation's id and so fail it at its node.
            self._refuse(f"it is malformed ({exc})", delivery)
            return
        if esc.get("node_id") != node:
            # Another node's reply topic, or one no node vouches for: its answers (and a `start`
            # that voids what that node was streaming) must not be addressable by whoever asks.
            who = f"its node_id {shown(esc['node_id'])}" if "node_id" in esc else "no node_id"
            self._refuse(f"{who} for the Response Topic {shown(reply)}", delivery)
            return
        esc_id = esc["escalation_id"]
        key = (node, esc_id)
        with self._lock:
            final = self._answered.get(key)
            if final is None and key in self._running:
                self._running[key].append(delivery)  # acknowledged with the first one
                self._again.setdefault(key, []).append((reply, correlation))
                log.info("escalation %s delivered again while running", esc_id)
                return
            if final is None:
                self._running[key] = [delivery]
        if final is not None:
            log.info("escalation %s asked again; replaying its answer", esc_id)
            self._publish(reply, final, correlation, wait=True)
            self._ack([delivery])
            return
        log.info("escalation %s from %s: %s", esc_id, node, shown(esc.get("reason", {})))
        deliveries: list[tuple[int, int, int]] = []
        try:
            try:
                final = self._complete(esc, reply, correlation)
            except Exception as exc:  # a reply we cannot read: an error answer, never silence
                log.exception("escalation %s failed", esc_id)
                final = self._error(esc_id, f"worker failed: {exc}")
            self._publish(reply, final, correlation, wait=True)
            with self._lock:
                self._remember(key, final)
        finally:  # whatever happened, this escalation is no longer running
            with self._lock:
                deliveries = self._running.pop(key, [])
                again = self._again.pop(key, [])
        answered = {(reply, correlation)}
        for address in dict.fromkeys(again):  # the asker records one answer per id
            if address in answered:
                continue
            answered.add(address)
            log.info("escalation %s was asked again while running; replaying its answer", esc_id)
            self._publish(address[0], final, address[1], wait=True)
        self._ack(deliveries)

    def _refuse(self, why: str, delivery: tuple[int, int, int]) -> None:
        """Answer nothing, and acknowledge the escalation so the broker does not deliver it
        again (to this worker or another, which would refuse it too)."""
        with self._lock:
            self.counters["refused_reply_topic"] += 1
            refused = self.counters["refused_reply_topic"]
        log.warning("refused an escalation (%d so far): %s", refused, why)
        self._ack([delivery])

    def _remember(self, key: EscalationKey, final: dict[str, Any]) -> None:
        """Keep an answer for duplicates, within RECENT_ANSWERS and RECENT_ANSWER_BYTES."""
        old = self._answered.pop(key, None)
        if old is not None:
            self._answered_bytes -= len(old.get("text", ""))
        self._answered[key] = final
        self._answered_bytes += len(final.get("text", ""))
        while len(self._answered) > RECENT_ANSWERS or self._answered_bytes > RECENT_ANSWER_BYTES:
            _, gone = self._answered.popitem(last=False)
            self._answered_bytes -= len(gone.get("text", ""))

    def _complete(self, esc: dict[str, Any], reply: str,
                  correlation: Optional[bytes]) -> dict[str, Any]:  # fmt: skip
        """Stream one chat completion, forwarding text; return the final event. The text stops at
        max_answer_bytes (finish_reason "length"), the answer at request_timeout_s."""
        w = self.cfg.worker
        esc_id = esc["escalation_id"]
        body = {
            "model": w.model,
            "messages": esc["messages"],
            "max_tokens": min(esc.get("max_tokens", w.max_tokens), w.max_tokens),
            "temperature": esc.get("temperature", w.temperature),
            "stream": True,
        }
        shape = response_format(esc.get("format"), w.response_format)
        if shape is not None:
            body["response_format"] = shape
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(  # noqa: S310 (base_url is checked to be http(s))
            w.base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers=headers,
        )
        t0 = time.monotonic()
        # An answer can be streamed more than once (this worker restarted mid-answer and the
        # broker gave the escalation back): `start` tells the edge to drop what came before.
        self._publish(reply, {"event": "start", "escalation_id": esc_id}, correlation)
        answer = Answer(w.max_answer_bytes, w.model)
        last_flush = 0.0
        try:
            with self._opener.open(request, timeout=w.request_timeout_s) as resp:
                for data in sse_data(resp, t0 + w.request_timeout_s):
                    if data == "[DONE]":
                        break
                    answer.take(json.loads(data))
                    now = time.monotonic()
                    if answer.pending and now - last_flush >= w.token_interval_ms / 1000:
                        self._publish_tokens(reply, esc_id, answer.pending, correlation)
                        last_flush = now
                    if answer.full:  # the rest is not read: closing the stream ends it
                        break
            self._publish_tokens(reply, esc_id, answer.pending, correlation)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                where = shown(exc.headers.get("Location"))
                return self._error(esc_id, f"model server redirected to {where}, not followed")
            detail = exc.read(300).decode("utf-8", errors="replace")
            return self._error(esc_id, f"model server answered HTTP {exc.code}: {detail}")
        except TimeoutError:
            return self._error(
                esc_id, f"model server failed: no complete answer within {w.request_timeout_s:g} s"
            )
        except (OSError, ValueError) as exc:
            return self._error(esc_id, f"model server failed: {exc}")
        end = time.monotonic()
        return {
            "event": "done",
            "escalation_id": esc_id,
            "text": "".join(answer.parts),
            "model": answer.model,
            "finish_reason": answer.finish,
            "usage": answer.usage,
            "worker_id": self.worker_id,
            "timings": {
                "ttft_ms": round(((answer.first_at or end) - t0) * 1000, 1),
                "total_ms": round((end - t0) * 1000, 1),
            },
        }

    def _error(self, esc_id: str, message: str) -> dict[str, Any]:
        log.warning("escalation %s: %s", esc_id, message)
        event = protocol.error_event(None, protocol.CLOUD_ERROR, message)
        event.update(escalation_id=esc_id, worker_id=self.worker_id)
        return event

    def _publish_tokens(self, reply: str, esc_id: str, pending: list[str],
                        correlation: Optional[bytes]) -> None:  # fmt: skip
        if pending:
            event = {"event": "token", "escalation_id": esc_id, "text": "".join(pending)}
            pending.clear()
            self._publish(reply, event, correlation)

    def _publish(self, topic: str, event: dict[str, Any], correlation: Optional[bytes],
                 wait: bool = False) -> None:  # fmt: skip
        info = self.client.publish(
            topic, json.dumps(event), 1, False, publish_properties(correlation)
        )
        if wait:
            wait_published(info, PUBLISH_TIMEOUT_S)

    def _ack(self, deliveries: list[tuple[int, int, int]]) -> None:
        with self._lock:
            generation = self._generation
        for mid, qos, gen in deliveries:
            # A message id from an earlier connection may name another message now; the broker
            # delivers that escalation again and the duplicate is acknowledged instead.
            if gen == generation:
                self.client.ack(mid, qos)

    # --- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        c, w = self.cfg.cloud, self.cfg.worker
        notifier = Notifier()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.client.connect_async(
            c.host, c.port, c.keepalive, clean_start=False,
            properties=connect_properties(c.session_expiry_s, receive_maximum=w.concurrency),
        )  # fmt: skip
        self.client.loop_start()
        log.info(
            "cloud worker %s: broker %s:%d, model %s at %s, %d at once",
            self.worker_id, c.host, c.port, w.model, w.base_url, w.concurrency,
        )  # fmt: skip
        notifier.ready(f"worker {self.worker_id}")
        while not self._stop.wait(5.0):
            with self._lock:
                running, refused = len(self._running), self.counters["refused_reply_topic"]
            notifier.status(f"{running} escalation(s) running, {refused} refused")
            notifier.watchdog()
        log.info("stopping: finishing running escalations")
        notifier.stopping("finishing running escalations")
        self._pool.shutdown(wait=True, cancel_futures=True)
        info = self.client.publish(self.status_topic, self._status("offline", "shutdown"), 1, True)
        wait_published(info, 5.0)
        self.client.disconnect()
        self.client.loop_stop()
        return 0
