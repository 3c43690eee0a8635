"""The cloud worker: answers edge nodes' escalations with an OpenAI-compatible model server.

`edgeagent cloud-worker --config FILE` runs next to vLLM or TGI. It takes escalations from a
shared subscription on the cloud broker (several workers split the load), streams each chat
completion back to the asking node's reply topic, and acknowledges an escalation to the broker
only after its final reply, so one that a dying worker had not finished goes to another worker.
A duplicate of an escalation id is answered once: replayed when done, ignored while running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import __version__, protocol
from edgeagent.config import Config
from edgeagent.mqtt_client import connect_properties, new_client, publish_properties, read_secret
from edgeagent.systemd import Notifier
from edgeagent.topics import CloudTopics

log = logging.getLogger("edgeagent.worker")

API_KEY_ENV = "EDGEAGENT_CLOUD_API_KEY"
API_KEY_CREDENTIAL = "cloud-api-key"
RECENT_ANSWERS = 10_000
PUBLISH_TIMEOUT_S = 30.0


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
    return obj


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
            w.api_key_file, API_KEY_CREDENTIAL
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            w.concurrency, thread_name_prefix="ea-completion"
        )
        self._lock = threading.Lock()
        self._generation = 0
        # id -> [(mid, qos, generation), ...]: the first delivery and any duplicate of it
        self._running: dict[str, list[tuple[int, int, int]]] = {}
        # id -> reply addresses of duplicates that came while it ran: answered too, because
        # the first answer may have gone out while the asker was not subscribed (a broker
        # restarted without persistence) and the duplicate is the asker asking again.
        self._again: dict[str, list[tuple[str, Optional[bytes]]]] = {}
        self._answered: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._stop = threading.Event()
        self.client = new_client(
            c.client_id or f"edgeagent-worker-{self.worker_id}",
            manual_ack=True,
            username=c.username,
            password=read_secret(c.password_file, "cloud-password") if c.username else None,
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
        if not reply:
            log.warning("dropping an escalation without a Response Topic")
            self._ack([delivery])
            return
        try:
            esc = parse_escalation(payload)
        except EscalationError as exc:
            event = protocol.error_event(None, protocol.BAD_REQUEST, str(exc))
            event["escalation_id"] = correlation.decode(errors="replace") if correlation else None
            self._publish(reply, event, correlation, wait=True)
            self._ack([delivery])
            return
        esc_id = esc["escalation_id"]
        with self._lock:
            final = self._answered.get(esc_id)
            if final is None and esc_id in self._running:
                self._running[esc_id].append(delivery)  # acknowledged with the first one
                self._again.setdefault(esc_id, []).append((reply, correlation))
                log.info("escalation %s delivered again while running", esc_id)
                return
            if final is None:
                self._running[esc_id] = [delivery]
        if final is not None:
            log.info("escalation %s asked again; replaying its answer", esc_id)
            self._publish(reply, final, correlation, wait=True)
            self._ack([delivery])
            return
        log.info("escalation %s from %s: %s", esc_id, esc.get("node_id", "?"),
                 json.dumps(esc.get("reason", {})))  # fmt: skip
        deliveries: list[tuple[int, int, int]] = []
        try:
            try:
                final = self._complete(esc, reply, correlation)
            except Exception as exc:  # a reply we cannot read: an error answer, never silence
                log.exception("escalation %s failed", esc_id)
                final = self._error(esc_id, f"worker failed: {exc}")
            self._publish(reply, final, correlation, wait=True)
            with self._lock:
                self._answered[esc_id] = final
                while len(self._answered) > RECENT_ANSWERS:
                    self._answered.popitem(last=False)
        finally:  # whatever happened, this id is no longer running
            with self._lock:
                deliveries = self._running.pop(esc_id, [])
                again = self._again.pop(esc_id, [])
        answered = {(reply, correlation)}
        for address in dict.fromkeys(again):  # the asker records one answer per id
            if address in answered:
                continue
            answered.add(address)
            log.info("escalation %s was asked again while running; replaying its answer", esc_id)
            self._publish(address[0], final, address[1], wait=True)
        self._ack(deliveries)

    def _complete(self, esc: dict[str, Any], reply: str,
                  correlation: Optional[bytes]) -> dict[str, Any]:  # fmt: skip
        """Stream one chat completion, forwarding text; return the final event."""
        w = self.cfg.worker
        esc_id = esc["escalation_id"]
        body = {
            "model": w.model,
            "messages": esc["messages"],
            "max_tokens": min(esc.get("max_tokens", w.max_tokens), w.max_tokens),
            "temperature": esc.get("temperature", w.temperature),
            "stream": True,
        }
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
        parts: list[str] = []
        pending: list[str] = []
        last_flush, first_at = 0.0, None
        finish, model = "stop", w.model
        usage: dict[str, Any] = {}
        try:
            with urllib.request.urlopen(request, timeout=w.request_timeout_s) as resp:  # noqa: S310
                for raw in resp:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    model = chunk.get("model") or model
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            parts.append(text)
                            pending.append(text)
                            first_at = first_at or time.monotonic()
                        finish = choice.get("finish_reason") or finish
                    now = time.monotonic()
                    if pending and now - last_flush >= w.token_interval_ms / 1000:
                        self._publish_tokens(reply, esc_id, pending, correlation)
                        last_flush = now
                    if now - t0 > w.request_timeout_s:
                        raise TimeoutError(f"no complete answer within {w.request_timeout_s} s")
            self._publish_tokens(reply, esc_id, pending, correlation)
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", errors="replace")
            return self._error(esc_id, f"model server answered HTTP {exc.code}: {detail}")
        except (OSError, TimeoutError, ValueError) as exc:
            return self._error(esc_id, f"model server failed: {exc}")
        end = time.monotonic()
        return {
            "event": "done",
            "escalation_id": esc_id,
            "text": "".join(parts),
            "model": model,
            "finish_reason": finish,
            "usage": usage,
            "worker_id": self.worker_id,
            "timings": {
                "ttft_ms": round(((first_at or end) - t0) * 1000, 1),
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
                running = len(self._running)
            notifier.status(f"{running} escalation(s) running")
            notifier.watchdog()
        log.info("stopping: finishing running escalations")
        notifier.stopping("finishing running escalations")
        self._pool.shutdown(wait=True, cancel_futures=True)
        info = self.client.publish(self.status_topic, self._status("offline", "shutdown"), 1, True)
        wait_published(info, 5.0)
        self.client.disconnect()
        self.client.loop_stop()
        return 0
