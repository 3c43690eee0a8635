"""Real mosquitto brokers on free loopback ports, and a real paho client that collects replies."""

from __future__ import annotations

import getpass
import json
import queue
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """A mosquitto process with its own config, persistence and log under `workdir`."""

    def __init__(self, workdir: Path, *, users: Optional[dict[str, str]] = None,
                 acl: str = "", listener_options: Sequence[str] = ()) -> None:  # fmt: skip
        """`listener_options`: lines for the listener, e.g. its TLS `cafile`/`certfile`."""
        assert shutil.which("mosquitto"), "mosquitto is not installed (make test installs it)"
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            *listener_options,
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            f"log_dest file {workdir}/mosquitto.log",
            "log_type all",
            # Run as root, mosquitto would switch to its own user and lose access to workdir.
            f"user {getpass.getuser()}",
        ]
        if users:
            pwfile = workdir / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if acl:
            (workdir / "acl").write_text(acl)
            lines.append(f"acl_file {workdir}/acl")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log()}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Requester:
    """A real MQTT client that publishes requests and collects every reply with its properties."""

    def __init__(self, port: int, *, v5: bool = True, persistent: bool = False,
                 username: str = "", password: str = "",
                 tls: Optional[tuple[Path, Optional[Path], Optional[Path]]] = None,
                 ) -> None:  # fmt: skip
        """`tls`: (CA file, client certificate, client key) to connect over TLS."""
        self.v5 = v5
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}"
        self.messages: queue.Queue[tuple[str, dict[str, Any], Optional[bytes]]] = queue.Queue()
        cid = f"req-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=cid,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent,
        )  # fmt: skip
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            ca, cert, key = tls
            self.client.tls_set(str(ca), cert and str(cert), key and str(key))
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.subscribed: queue.Queue[bool] = queue.Queue()
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect(
            "127.0.0.1", port, 5, clean_start=not persistent if v5 else 3, properties=props
        )
        self.client.loop_start()
        assert self.subscribed.get(timeout=10)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(self.reply_topic, 1), ("edgeagent/+/status", 1)])
            self.subscribed.put(True)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload.decode(errors="replace")}
        self.messages.put((msg.topic, payload, corr))

    def publish(self, topic: str, payload: Any, *, correlation: Optional[bytes] = None,
                response_topic: Optional[str] = None, qos: int = 1) -> None:  # fmt: skip
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = None
        if self.v5 and (correlation is not None or response_topic is not None):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(topic, data, qos, False, props).wait_for_publish(10)

    def next(
        self, timeout: float = 60, topic: Optional[str] = None
    ) -> tuple[dict[str, Any], Optional[bytes]]:
        """The next message on `topic` (default: the reply topic)."""
        want = topic or self.reply_topic
        deadline = time.monotonic() + timeout
        while True:
            t, payload, corr = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if t == want:
                return payload, corr

    def wait_online(self, status_topic: str = "edgeagent/test-node/status",
                    timeout: float = 30) -> None:  # fmt: skip
        """Until a daemon's retained status says online: it publishes that right after
        subscribing, so requests published from then on reach it."""
        self.client.subscribe(status_topic, 1)
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.next(timeout=max(0.01, deadline - time.monotonic()),
                                  topic=status_topic)  # fmt: skip
            if status.get("state") == "online":
                return

    def finals(self, ids: set[str], timeout: float = 120) -> dict[str, list[dict[str, Any]]]:
        """Collect replies until every id has a final event; returns every event per id."""
        out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            event, _ = self.next(timeout=max(0.01, deadline - time.monotonic()))
            rid = event.get("id")
            if rid in out:
                out[rid].append(event)
                if event.get("event") in ("done", "error"):
                    pending.discard(rid)
        return out

    def drain(self, seconds: float) -> list[dict[str, Any]]:
        """Everything that arrives on the reply topic within `seconds`."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                t, payload, _ = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if t == self.reply_topic:
                out.append(payload)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
