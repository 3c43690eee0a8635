#!/usr/bin/env python3
"""Soak edgeagent: steady mixed load with periodic faults; a lost answer or a leak fails it.

Starts its whole stack as real processes in a temporary directory: a local and a cloud
mosquitto on free loopback ports, llama-cpp-python's OpenAI-compatible server serving the
local model (the stand-in for the cloud's Llama3-8B), `edgeagent cloud-worker` and
`edgeagent run`. Then, for --minutes, terminals on the Unix socket and line equipment on MQTT
(v5 and v3.1.1) ask questions with small max_tokens: plain ones, session turns, escalations
to the cloud (flag, keyword, deep topic), cancels, malformed lines, and now and then a burst
that fills the queue. Every --fault-every seconds one fault hits the stack:

- the daemon restarted with SIGTERM (only in the first third of the run, so the last two
  thirds are one daemon process, checked for leaks);
- the local broker restarted; the cloud broker flapping (down and up three times);
- the cloud worker killed with SIGKILL while it streams an answer, then started again.

The daemon runs one inference thread (the stand-in takes the other core of a small box) and
small caches (4 sessions of 4 turns, 32 MB of saved session state), and each daemon process
first gets a prompt longer than any of the load's, so that bounded buffers fill during the
warm-up and growth after it means a leak.

Every 5 s a row goes to soak.csv: daemon RSS, open fds, threads, requests sent, answered,
errors and busy, answer latency p50/p95 over the last 30 s, spool depth, link states. At the
end the load stops, the stack drains, and the run fails (exit 1) when:

- an accepted request got no final event (lost) or more than one (duplicated), counted per
  request id from what the clients received. Accepted means not refused with `busy` and, on
  the socket, not written to a connection the daemon had already closed or cut off by a
  daemon restart before the daemon said anything about it (allowed only during a restart);
  on MQTT, acknowledged by the broker (or answered);
- a malformed request is not refused with `bad_request`;
- an escalation that was queued, timed out or failed over is not answered by the cloud in
  the end, or one got more than one `cloud_answer`;
- a streamed answer's tokens since its last `restart` are not its text, unless an MQTT
  broker restart during it explains it (a token event delivered twice): those are counted;
- the daemon leaks over the last two thirds: least-squares growth of RSS of 20 MB or more,
  of open fds by more than 4, of threads by more than 2.

The outcome goes to tests/reliability.py's record() (category "soak") for
docs/reliability.md, the CSV and a plot (soak.png) to --out.

    make soak                                           # 30 minutes; figures into docs/
    .venv/bin/python scripts/soak.py --minutes 3 --out run/soak
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeagent import models
from tests.mqtt_helpers import Broker, free_port
from tests.reliability import record

NODE = "soak"
STAND_IN = "stand-in-llama3-8b"
SAMPLE_S = 5.0
LATENCY_WINDOW_S = 30.0
RSS_GROWTH_MAX_MB = 20.0
FDS_GROWTH_MAX = 4.0
THREADS_GROWTH_MAX = 2.0
FINAL_WAIT_S = 300.0  # a client gives up waiting after this (a late answer still counts)
DRAIN_S = 240.0  # after the load stops: for the last answers and the spool to empty
READY_S = 90.0

PROMPTS = [
    "What does OEE mean on a production line?",
    "Name one cause of a conveyor belt drifting.",
    "Why would a pneumatic cylinder move slowly?",
    "What is a PLC?",
    "Give one reason a motor overheats.",
    "What does an E-STOP do?",
    "How often should a filler nozzle be cleaned?",
    "What is predictive maintenance?",
]
ESCALATED = [
    ("What is the torque spec for an M8 bolt?", {}),  # the keyword rule
    ("Which lubricant suits a gearbox at 80 C?", {"escalate": True}),
]
# Lines the daemon must refuse with bad_request; those without a readable id get `id: null`.
MALFORMED_NO_ID = [
    b"{not json",
    b"\xff\xfe not utf-8",
    b'{"id": "x\x00y", "prompt": "NUL inside a string"}',
    b"[1, 2, 3]",
    b'{"prompt": "no id at all"}',
]
MALFORMED_WITH_ID: list[Callable[[str], dict[str, Any]]] = [
    lambda rid: {"id": rid, "prompt": 5},
    lambda rid: {"id": rid, "prompt": "hi", "max_tokens": -3},
    lambda rid: {"id": rid, "prompt": "hi", "ignore_previous_instructions": True},
    lambda rid: {"id": rid, "messages": [{"role": "root", "content": "hi"}]},
]
SOCKET_MIX = {"plain": 55, "session": 15, "escalate": 10, "cancel": 8, "malformed": 12}
MQTT_MIX = {"plain": 70, "escalate": 10, "cancel": 8, "malformed": 12}


def now() -> float:
    return time.monotonic()


# --- what the clients saw ---------------------------------------------------------------------


@dataclass
class Ask:
    """One request as its client saw it."""

    rid: str
    kind: str
    transport: str
    sent: float
    events: int = 0
    finals: list[dict[str, Any]] = field(default_factory=list)
    final_at: Optional[float] = None
    mid: Optional[int] = None  # MQTT message id of the publish
    cut_off: Optional[float] = None  # socket closed before the daemon said anything about it
    undelivered: bool = False  # socket: the connection was already closed when it was sent
    followups: list[str] = field(default_factory=list)  # statuses of cloud_answer events
    tokens: list[str] = field(default_factory=list)
    resets: int = 0  # `restart` events: the answer started again
    first_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def busy(self) -> bool:
        return bool(self.finals) and self.finals[0].get("code") == "busy"

    @property
    def escalation(self) -> dict[str, Any]:
        done = next((f for f in self.finals if f.get("event") == "done"), {})
        esc = done.get("escalation")
        return esc if isinstance(esc, dict) else {}


class Ledger:
    """Every request sent and every event received, by request id (ids are unique per run)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.asks: dict[str, Ask] = {}
        self.strays: list[dict[str, Any]] = []
        self.acked_mids: dict[str, set[int]] = {}

    def sent(self, rid: str, kind: str, transport: str) -> Ask:
        ask = Ask(rid, kind, transport, now())
        with self.lock:
            self.asks[rid] = ask
        return ask

    def event(self, rid: Optional[str], event: dict[str, Any]) -> None:
        with self.lock:
            ask = self.asks.get(rid) if rid is not None else None
            if ask is None:
                self.strays.append(event)
                return
            ask.events += 1
            kind = event.get("event")
            if kind in ("done", "error"):
                ask.finals.append(event)
                if ask.final_at is None:
                    ask.final_at = now()
            elif kind == "cloud_answer":
                ask.followups.append(str(event.get("status")))
            elif kind == "token":
                ask.tokens.append(str(event.get("text")))
            elif kind == "restart":  # the answer starts again (docs/protocol.md)
                ask.tokens.clear()
                ask.resets += 1
        ask.first_event.set()
        if kind in ("done", "error"):
            ask.finished.set()

    def acked(self, client: str, mid: int) -> None:
        with self.lock:
            self.acked_mids.setdefault(client, set()).add(mid)

    def snapshot(self) -> list[Ask]:
        with self.lock:
            return list(self.asks.values())

    def accepted(self, ask: Ask) -> bool:
        if ask.busy or ask.undelivered:
            return False
        if ask.events:
            return True
        if ask.transport == "socket":
            return ask.cut_off is None
        with self.lock:
            return ask.mid is not None and ask.mid in self.acked_mids.get(ask.transport, set())

    def counts(self) -> dict[str, int]:
        asks = self.snapshot()
        finals = [a.finals[0] for a in asks if a.finals]
        return {
            "sent": len(asks),
            "answered": sum(1 for f in finals if f.get("event") == "done"),
            "errors": sum(1 for f in finals if f.get("event") == "error" and f["code"] != "busy"),
            "busy": sum(1 for f in finals if f.get("code") == "busy"),
            "pending": sum(
                1 for a in asks if not a.finals and a.cut_off is None and not a.undelivered
            ),
        }

    def latencies_ms(self, since: float = 0.0) -> list[float]:
        return [
            (a.final_at - a.sent) * 1000
            for a in self.snapshot()
            if a.final_at is not None
            and a.final_at >= since
            and a.finals[0]["event"] == "done"
            and a.kind != "prime"
        ]


def pct(values: list[float], p: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the stack ---------------------------------------------------------------------------------


class Process:
    """A background process with its log file; stop() and kill() reap it."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log_path = name, args, log
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.alive and self.proc is not None else None

    def stop(self, timeout: float = 60) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def socket_status(path: str, timeout: float = 3.0) -> Optional[dict[str, Any]]:
    """The daemon's status over its socket, or None when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b'{"op": "status"}\n')
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
        status: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        return status if status.get("event") == "status" else None
    except (OSError, ValueError):
        return None


class Stack:
    """Brokers, the stand-in model server, the cloud worker and the daemon, in `work`."""

    def __init__(self, work: Path, model_file: Path) -> None:
        self.work, self.model_file = work, model_file
        (work / "local-broker").mkdir()
        (work / "cloud-broker").mkdir()
        self.local = Broker(work / "local-broker")
        self.cloud = Broker(work / "cloud-broker")
        self.api_port = free_port()
        self.server = Process(
            "stand-in",
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file),
             "--host", "127.0.0.1", "--port", str(self.api_port), "--n_ctx", "2048",
             "--n_threads", "1", "--model_alias", STAND_IN],
            work / "stand-in.log",
        )  # fmt: skip
        worker_cfg = work / "worker.toml"
        worker_cfg.write_text(
            f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {self.cloud.port}\n'
            "keepalive = 2\nreconnect_min_s = 1\nreconnect_max_s = 2\n"
            f'[worker]\nworker_id = "soak-worker"\nbase_url = "http://127.0.0.1:{self.api_port}/v1"\n'
            f'model = "{STAND_IN}"\nconcurrency = 2\ntoken_interval_ms = 0\n'
            "request_timeout_s = 60\nmax_tokens = 64\n"
        )
        self.worker = Process(
            "cloud-worker",
            [sys.executable, "-m", "edgeagent", "cloud-worker", "--config", str(worker_cfg)],
            work / "worker.log",
        )
        self.socket_path = str(work / "edgeagent.sock")
        daemon_cfg = work / "edgeagent.toml"
        daemon_cfg.write_text(
            f'node_id = "{NODE}"\n'
            f'[model]\npath = "{model_file}"\nn_ctx = 2048\nmax_tokens = 64\ntemperature = 0.2\n'
            "[cpu]\nthreads = 1\n"  # the stand-in takes the other core; robust beside other load
            "[engine]\nqueue_size = 8\nmax_sessions = 4\nsession_max_turns = 4\n"
            f'session_cache_mb = 32\nprefix_cache_dir = "{work / "prefix"}"\n'
            f'[socket]\npath = "{self.socket_path}"\n[http]\nenabled = false\n'
            '[log]\nlevel = "info"\n'
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {self.local.port}\n'
            "keepalive = 2\nreconnect_min_s = 1\nreconnect_max_s = 2\nmetrics_interval_s = 10\n"
            f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {self.cloud.port}\n'
            "keepalive = 2\nreconnect_min_s = 1\nreconnect_max_s = 2\n"
            '[escalation]\nenabled = true\nkeywords = ["torque spec"]\ntimeout_s = 15\n'
            f'max_tokens = 8\nspool_path = "{work / "spool.sqlite"}"\n'
        )
        self.daemon = Process(
            "daemon",
            [sys.executable, "-m", "edgeagent", "run", "--config", str(daemon_cfg)],
            work / "daemon.log",
        )
        self.daemon_pids: list[int] = []

    def start(self) -> None:
        self.local.start()
        self.cloud.start()
        self.server.start()
        deadline = now() + READY_S
        while True:
            try:
                url = f"http://127.0.0.1:{self.api_port}/v1/models"
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if not self.server.alive or now() > deadline:
                    tail = self.server.tail()
                    raise RuntimeError(f"the stand-in did not start:\n{tail}") from None
                time.sleep(0.3)
        self.worker.start()
        self.start_daemon()
        self.wait_links()

    def start_daemon(self) -> float:
        """Start the daemon; seconds until it answers status."""
        t0 = now()
        self.daemon.start()
        assert self.daemon.proc is not None
        self.daemon_pids.append(self.daemon.proc.pid)
        while now() - t0 < READY_S:
            if not self.daemon.alive:
                raise RuntimeError(f"the daemon exited:\n{self.daemon.tail()}")
            if socket_status(self.socket_path) is not None:
                return now() - t0
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not become ready:\n{self.daemon.tail()}")

    def wait_links(self, timeout: float = READY_S) -> float:
        """Seconds until the daemon's MQTT link and cloud link are both up again."""
        t0 = now()
        while now() - t0 < timeout:
            status = socket_status(self.socket_path)
            if status and status["mqtt"]["connected"] and status["escalation"]["link"]["up"]:
                return now() - t0
            time.sleep(0.25)
        raise RuntimeError(f"links not up after {timeout:.0f} s:\n{self.daemon.tail()}")

    def stop(self) -> None:
        for proc in (self.daemon, self.worker, self.server):
            proc.stop(30)
        for broker in (self.local, self.cloud):
            if broker.proc is not None and broker.proc.poll() is None:
                broker.proc.terminate()
                try:
                    broker.proc.wait(10)
                except subprocess.TimeoutExpired:
                    broker.proc.kill()
                    broker.proc.wait()


# --- load ----------------------------------------------------------------------------------------


class LineConn:
    """A JSON-lines connection that hands every event to the ledger."""

    def __init__(self, path: str, ledger: Ledger) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(1.0)
        self.sock.connect(path)
        self.ledger = ledger
        self.buf = b""
        self.idless: Optional[Ask] = None  # the malformed request an `id: null` error is for

    def send(self, data: bytes, *asks: Ask) -> None:
        """Send a line; when the daemon has already closed the connection, the client knows
        at once that `asks` were not delivered (like a refused connection)."""
        try:
            self.sock.sendall(data + b"\n")
        except OSError:
            for ask in asks:
                ask.undelivered = True
            raise

    def pump(self) -> None:
        """Read what has arrived (up to one second's wait); raises EOFError on hang-up."""
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return
        if not chunk:
            raise EOFError
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            event = json.loads(line)
            rid = event.get("id")
            if rid is None and event.get("event") == "error" and self.idless is not None:
                rid, self.idless = self.idless.rid, None
            self.ledger.event(rid, event)

    def wait(self, flag: threading.Event, timeout: float, abort: threading.Event) -> None:
        deadline = now() + timeout
        while not flag.is_set() and now() < deadline and not abort.is_set():
            self.pump()

    def close(self) -> None:
        self.sock.close()


class Client(threading.Thread):
    """A closed-loop client: ask, wait for the final event, think, ask again."""

    transport = ""
    mix: ClassVar[dict[str, int]] = {}

    def __init__(self, name: str, ledger: Ledger, seed: int, stop: threading.Event,
                 abort: threading.Event) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.ledger, self.stop, self.abort = ledger, stop, abort
        self.rng = random.Random(seed)
        self.n = 0

    def next_id(self, kind: str) -> str:
        self.n += 1
        return f"{self.name}-{self.n}-{kind}"

    def pick(self) -> str:
        return self.rng.choices(list(self.mix), list(self.mix.values()))[0]

    def think(self) -> None:
        self.stop.wait(self.rng.uniform(1.0, 4.0))

    def question(self, kind: str) -> dict[str, Any]:
        if kind == "escalate":
            prompt, extra = self.rng.choice(ESCALATED)
            return {"prompt": prompt, "max_tokens": 8, **extra}
        if kind == "cancel":
            return {"prompt": self.rng.choice(PROMPTS) + " Explain in detail.", "max_tokens": 48}
        return {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(4, 16),
                "stream": self.rng.random() < 0.8}  # fmt: skip


class Terminal(Client):
    """A factory terminal on the Unix socket, one request at a time, reconnecting as needed."""

    transport = "socket"
    mix = SOCKET_MIX

    def __init__(self, name: str, path: str, ledger: Ledger, seed: int, stop: threading.Event,
                 abort: threading.Event) -> None:  # fmt: skip
        super().__init__(name, ledger, seed, stop, abort)
        self.path = path
        self.current: Optional[Ask] = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = LineConn(self.path, self.ledger)
            except OSError:
                self.stop.wait(0.3)
                continue
            try:
                while not self.stop.is_set():
                    self.one(conn, self.pick())
                    self.think()
                conn.wait(threading.Event(), 2.0, self.abort)  # late follow-ups
            except (OSError, EOFError, ValueError):
                ask = self.current
                if ask is not None and ask.events == 0 and not ask.undelivered:
                    ask.cut_off = now()
            finally:
                self.current = None
                conn.close()

    def one(self, conn: LineConn, kind: str) -> None:
        rid = self.next_id(kind)
        if kind == "malformed":
            pick = self.rng.randrange(len(MALFORMED_NO_ID) + len(MALFORMED_WITH_ID))
            if pick < len(MALFORMED_NO_ID):
                line = MALFORMED_NO_ID[pick]
                ask = self.current = self.ledger.sent(rid, kind, self.transport)
                conn.idless = ask
            else:
                line = json.dumps(MALFORMED_WITH_ID[pick - len(MALFORMED_NO_ID)](rid)).encode()
                ask = self.current = self.ledger.sent(rid, kind, self.transport)
        else:
            request = {"id": rid, **self.question(kind)}
            if kind == "session":
                request["session"] = f"{self.name}-conversation"
            line = json.dumps(request).encode()
            ask = self.current = self.ledger.sent(rid, kind, self.transport)
        conn.send(line, ask)
        if kind == "cancel":
            conn.wait(ask.first_event, 20, self.abort)
            conn.send(json.dumps({"op": "cancel", "id": rid}).encode())
        conn.wait(ask.finished, FINAL_WAIT_S, self.abort)
        self.current = None


class Line(Client):
    """Line equipment on MQTT: v5 (Response Topic, Correlation Data) or v3.1.1 (reply_to)."""

    mix = MQTT_MIX

    def __init__(self, name: str, port: int, v5: bool, ledger: Ledger, seed: int,
                 stop: threading.Event, abort: threading.Event) -> None:  # fmt: skip
        super().__init__(name, ledger, seed, stop, abort)
        self.v5 = v5
        self.transport = f"mqtt-{name}"
        self.reply_topic = f"soak/replies/{name}"
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"soak-{name}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else False,
        )  # fmt: skip
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: ledger.acked(self.transport, mid)
        self.client.on_message = self._on_message
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, 5, clean_start=False if v5 else 3,
                                  properties=props)  # fmt: skip
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.reply_topic, 1)
            self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        try:
            event = json.loads(msg.payload)
        except ValueError:
            event = {"event": "unreadable", "raw": msg.payload.decode(errors="replace")}
        rid = corr.decode(errors="replace") if corr else event.get("id")
        self.ledger.event(rid, event)

    def publish(self, topic: str, payload: bytes, rid: str) -> Optional[int]:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = rid.encode()
        info = self.client.publish(topic, payload, 1, False, props)
        return int(info.mid)

    def run(self) -> None:
        # The paho client stays connected after this returns, for late answers, until close().
        while not self.stop.is_set():
            if not self.connected.wait(1.0):
                continue
            self.one(self.pick())
            self.think()

    def close(self) -> None:
        if self.client.is_connected() or self.connected.is_set():
            self.client.disconnect()
        self.client.loop_stop()

    def one(self, kind: str) -> None:
        rid = self.next_id(kind)
        topic = f"edgeagent/{NODE}/ask"
        if kind == "malformed":
            if self.v5:  # without an id, a v5 request takes its Correlation Data as id
                payload = self.rng.choice([m for m in MALFORMED_NO_ID if b"no id" not in m])
            else:
                payload = json.dumps(self.rng.choice(MALFORMED_WITH_ID)(rid)).encode()
        else:
            request = {"id": rid, **self.question(kind)}
            if kind == "escalate" and self.v5:
                request.pop("escalate", None)
                topic += "/deep"  # the topic rule
            payload = json.dumps(request).encode()
        if not self.v5:
            obj = json.loads(payload)
            obj["reply_to"] = self.reply_topic
            payload = json.dumps(obj).encode()
        ask = self.ledger.sent(rid, kind, self.transport)
        ask.mid = self.publish(topic, payload, rid)
        if kind == "cancel":
            ask.first_event.wait(20)
            op: dict[str, Any] = {"op": "cancel", "id": rid}
            if not self.v5:
                op["reply_to"] = self.reply_topic
            self.publish(f"edgeagent/{NODE}/ask", json.dumps(op).encode(), rid)
        deadline = now() + FINAL_WAIT_S
        while not ask.finished.wait(1.0) and now() < deadline and not self.abort.is_set():
            pass


class Burst(threading.Thread):
    """Every `every` s, one connection sends `size` requests at once: the queue fills, the
    excess must come back as `busy` at once."""

    def __init__(self, path: str, ledger: Ledger, every: float, size: int,
                 stop: threading.Event, abort: threading.Event) -> None:  # fmt: skip
        super().__init__(name="burst", daemon=True)
        self.path, self.ledger, self.every, self.size = path, ledger, every, size
        self.stop, self.abort = stop, abort
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.rounds += 1
            try:
                conn = LineConn(self.path, self.ledger)
            except OSError:
                continue
            asks = []
            try:
                lines = []
                for i in range(self.size):
                    rid = f"burst-{self.rounds}-{i}"
                    asks.append(self.ledger.sent(rid, "burst", "socket"))
                    lines.append(json.dumps({"id": rid, "prompt": PROMPTS[i % len(PROMPTS)],
                                             "max_tokens": 4}).encode())  # fmt: skip
                conn.send(b"\n".join(lines), *asks)
                for ask in asks:
                    conn.wait(ask.finished, FINAL_WAIT_S, self.abort)
            except (OSError, EOFError, ValueError):
                for ask in asks:
                    if ask.events == 0 and not ask.undelivered:
                        ask.cut_off = now()
            finally:
                conn.close()


# --- faults ----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    t: float  # seconds into the run
    detail: str = ""
    recovered_s: Optional[float] = None
    ok: bool = True


def schedule(duration: float, every: float) -> list[tuple[float, str]]:
    """When each fault hits: daemon restarts only while at least two fault periods of the first
    third remain (so the last two thirds are one warmed-up daemon), the rest in turn."""
    warm = duration / 3
    rotation = ["local_broker_restart", "cloud_broker_flap", "worker_kill"]
    out, t, i = [], every, 0
    while t < duration - every / 2:
        if t + 2 * every <= warm:
            out.append((t, "daemon_restart"))
        else:
            out.append((t, rotation[i % len(rotation)]))
            i += 1
        t += every
    return out


class Injector:
    """Applies the faults; each ends with the moment the stack was whole again (the fault's
    end), from which the recovery is timed: the daemon's MQTT link and cloud link up."""

    def __init__(self, stack: Stack, ledger: Ledger, abort: threading.Event) -> None:
        self.stack, self.ledger, self.abort = stack, ledger, abort
        self.restart_windows: list[tuple[float, float]] = []  # (SIGTERM sent, ready again)
        self.daemon_exit_codes: list[Optional[int]] = []
        self.askers: list[threading.Thread] = []
        self.worker_kills: list[float] = []
        self.local_broker_restarts: list[float] = []

    def hit(self, kind: str, t: float) -> Fault:
        fault = Fault(kind, t)
        try:
            getattr(self, kind)(fault)
            fault.recovered_s = round(self.stack.wait_links(), 2)
        except RuntimeError as exc:
            fault.ok, fault.detail = False, str(exc)
        return fault

    def daemon_restart(self, fault: Fault) -> None:
        t0 = now()
        code = self.stack.daemon.stop(60)
        self.daemon_exit_codes.append(code)
        ready = self.stack.start_daemon()
        self.restart_windows.append((t0, now()))
        self.prime()
        fault.detail = f"exit code {code}, ready again in {ready:.1f} s"
        if code != 0:
            raise RuntimeError(f"daemon exited with {code} on SIGTERM")

    def local_broker_restart(self, fault: Fault) -> None:
        self.local_broker_restarts.append(now())
        self.stack.local.stop()
        time.sleep(3)
        self.stack.local.start()
        fault.detail = "SIGTERM, 3 s down"

    def cloud_broker_flap(self, fault: Fault) -> None:
        for i in range(3):
            if i:
                time.sleep(4)
            self.stack.cloud.stop()
            time.sleep(3)
            self.stack.cloud.start()
        fault.detail = "3 x (3 s down, 4 s up)"

    def worker_kill(self, fault: Fault) -> None:
        """SIGKILL the worker while it streams the answer to an escalation sent for the purpose
        (long enough an answer that it is still streaming), then start it again."""
        rid = f"fault-{len(self.askers) + 1}-escalate"  # the keyword rule
        ask = self.ledger.sent(rid, "escalate", "socket")
        request = {"id": rid, "prompt": "List five uses of a torque spec.", "max_tokens": 48}
        asker = threading.Thread(target=self._ask, args=(ask, request), daemon=True)
        asker.start()
        self.askers.append(asker)
        ask.first_event.wait(30)
        streaming = ask.events > 0 and not ask.finished.is_set()
        self.stack.worker.kill()
        self.worker_kills.append(now())
        time.sleep(3)
        self.stack.worker.start()
        fault.detail = "killed " + ("mid-answer" if streaming else "between answers")

    def prime(self) -> None:
        """A prompt longer than any of the load's (~600 tokens: more than a batch), once per
        daemon process, in the warm-up: the KV cache and compute buffers reach the high-water
        mark the load needs before the leak window."""
        rid = f"prime-{len(self.askers) + 1}"
        ask = self.ledger.sent(rid, "prime", "socket")
        request = {"id": rid, "prompt": "Line 3 ran normally, no stops. " * 64, "max_tokens": 16}
        asker = threading.Thread(target=self._ask, args=(ask, request), daemon=True)
        asker.start()
        self.askers.append(asker)

    def _ask(self, ask: Ask, request: dict[str, Any]) -> None:
        try:
            conn = LineConn(self.stack.socket_path, self.ledger)
        except OSError:
            ask.cut_off = now()
            return
        try:
            conn.send(json.dumps(request).encode(), ask)
            conn.wait(ask.finished, FINAL_WAIT_S, self.abort)
        except (OSError, EOFError, ValueError):
            if ask.events == 0 and not ask.undelivered:
                ask.cut_off = now()
        finally:
            conn.close()


# --- sampling ----------------------------------------------------------------------------------

COLUMNS = [
    "t_s", "daemon_pid", "rss_mb", "fds", "threads", "sent", "answered", "errors", "busy",
    "pending", "latency_p50_ms", "latency_p95_ms", "spool_waiting", "queue_depth", "session_kv_mb",
    "mqtt_connected", "cloud_up", "fault",
]  # fmt: skip


class Sampler(threading.Thread):
    def __init__(self, stack: Stack, ledger: Ledger, t0: float, path: Path,
                 stop: threading.Event) -> None:  # fmt: skip
        super().__init__(name="sampler", daemon=True)
        self.stack, self.ledger, self.t0, self.stop = stack, ledger, t0, stop
        self.rows: list[dict[str, Any]] = []
        self.faults_started: list[str] = []
        self.path = path
        self.lock = threading.Lock()

    def run(self) -> None:
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            next_at = now()
            while not self.stop.is_set():
                row = self.sample()
                writer.writerow(row)
                f.flush()
                next_at += SAMPLE_S
                self.stop.wait(max(0.0, next_at - now()))

    def sample(self) -> dict[str, Any]:
        t = now()
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        row["t_s"] = round(t - self.t0, 1)
        pid = self.stack.daemon.pid
        if pid is not None:
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    row.update(daemon_pid=pid, rss_mb=round(p.memory_info().rss / 1e6, 1),
                               fds=p.num_fds(), threads=p.num_threads())  # fmt: skip
            except psutil.Error:
                pass
        row.update(self.ledger.counts())
        window = self.ledger.latencies_ms(since=t - LATENCY_WINDOW_S)
        p50, p95 = pct(window, 50), pct(window, 95)
        row["latency_p50_ms"] = "" if p50 is None else round(p50)
        row["latency_p95_ms"] = "" if p95 is None else round(p95)
        status = socket_status(self.stack.socket_path)
        if status is not None:
            esc = status.get("escalation", {})
            row.update(
                spool_waiting=esc.get("spool", {}).get("waiting", ""),
                queue_depth=status.get("queue_depth", ""),
                session_kv_mb=status.get("session_kv_mb", ""),
                mqtt_connected=int(bool(status.get("mqtt", {}).get("connected"))),
                cloud_up=int(bool(esc.get("link", {}).get("up"))),
            )
        with self.lock:
            row["fault"] = " ".join(self.faults_started)
            self.faults_started.clear()
        self.rows.append(row)
        return row

    def mark(self, kind: str) -> None:
        with self.lock:
            self.faults_started.append(kind)


# --- checks and output --------------------------------------------------------------------------


def growth(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    """Least-squares growth of `key` over the rows' time span."""
    pts = [(float(r["t_s"]), float(r[key])) for r in rows if r[key] != ""]
    if len(pts) < 3:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return slope * (pts[-1][0] - pts[0][0])


def outcome_in_spool(spool: Path, esc_id: str) -> str:
    """An escalation's state, read from the daemon's spool file as the box's operator can (a
    client's `result` op answers only for that client's own escalations)."""
    with contextlib.closing(sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=10)) as db:
        row = db.execute("SELECT state FROM escalations WHERE id = ?", (esc_id,)).fetchone()
    state = "unknown" if row is None else str(row[0])
    return "queued" if state == "waiting" else state


def plot(rows: list[dict[str, Any]], faults: list[Fault], warm: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["t_s"]) / 60, float(r[key])) for r in rows if r[key] != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ax_rss, ax_res, ax_load, ax_lat = axes
    ax_rss.plot(*series("rss_mb"), color="tab:blue")
    ax_rss.set_ylabel("daemon RSS (MB)")
    ax_res.plot(*series("fds"), label="open fds", color="tab:green")
    ax_res.plot(*series("threads"), label="threads", color="tab:purple")
    ax_res.set_ylabel("count")
    ax_res.legend(loc="upper left", fontsize=8)
    for key in ("answered", "errors", "busy"):
        xs, ys = series(key)  # cumulative counts; drawn as a rate over the last minute
        rate = [y - next((y0 for x0, y0 in zip(xs, ys) if x0 >= x - 1), y) for x, y in zip(xs, ys)]
        ax_load.plot(xs, rate, label=key)
    ax_load.set_ylabel("requests in the\nlast minute")
    ax_load.legend(loc="upper left", fontsize=8)
    x50, y50 = series("latency_p50_ms")
    x95, y95 = series("latency_p95_ms")
    ax_lat.plot(x50, [y / 1000 for y in y50], label="p50", color="tab:orange")
    ax_lat.plot(x95, [y / 1000 for y in y95], label="p95", color="tab:red")
    ax_lat.set_ylabel(f"answer latency (s),\nlast {LATENCY_WINDOW_S:.0f} s")
    spool = ax_lat.twinx()
    spool.plot(*series("spool_waiting"), color="tab:gray", linestyle=":", label="spool")
    spool.set_ylabel("spool waiting", color="tab:gray")
    ax_lat.legend(loc="upper left", fontsize=8)
    ax_lat.set_xlabel("minutes")
    colours = {"daemon_restart": "black", "local_broker_restart": "tab:blue",
               "cloud_broker_flap": "tab:cyan", "worker_kill": "tab:red"}  # fmt: skip
    for ax in axes:
        ax.axvspan(0, warm / 60, color="0.92", zorder=0)
        ax.grid(alpha=0.3)
        for f in faults:
            ax.axvline(f.t / 60, color=colours.get(f.kind, "k"), alpha=0.5, linestyle="--")
    for kind, colour in colours.items():
        ax_rss.plot([], [], color=colour, linestyle="--", label=kind.replace("_", " "))
    ax_rss.legend(loc="lower right", fontsize=7, ncol=2, title="faults (dashed)",
                  title_fontsize=7)  # fmt: skip
    ax_rss.set_title("edgeagent soak: grey = warm-up (not checked for leaks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def interrupted(_sig: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally` reaps every process the soak started."""
    raise KeyboardInterrupt


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass
class Outcome:
    """What the checks found, in the terms docs/reliability.md uses."""

    failures: list[str]
    accepted: list[Ask]
    answered: list[Ask]
    lost: list[Ask]
    duplicated: list[Ask]
    figures: dict[str, Any]


class Soak:
    """One run: the stack, the load and the faults, then the drain and the checks."""

    def __init__(self, args: argparse.Namespace, model_file: Path) -> None:
        self.args = args
        self.duration = args.minutes * 60
        self.every = args.fault_every or self.duration / 12
        self.warm = self.duration / 3
        self.work = Path(tempfile.mkdtemp(prefix="edgeagent-soak-"))
        self.stack = Stack(self.work, model_file)
        self.ledger = Ledger()
        self.stop_load, self.abort = threading.Event(), threading.Event()
        self.injector = Injector(self.stack, self.ledger, self.abort)
        self.clients: list[threading.Thread] = []
        self.lines: list[Line] = []
        self.sampler: Optional[Sampler] = None
        self.faults: list[Fault] = []
        self.failures: list[str] = []
        self.t0 = self.end = 0.0
        self.spool_left: Optional[int] = None

    def load_and_faults(self) -> None:
        a = self.args
        self.stack.start()
        self.injector.prime()
        self.t0 = now()
        self.sampler = Sampler(self.stack, self.ledger, self.t0, a.out / "soak.csv",
                               threading.Event())  # fmt: skip
        self.sampler.start()
        for i in range(a.terminals):
            self.clients.append(Terminal(f"term{i}", self.stack.socket_path, self.ledger,
                                         a.seed + i, self.stop_load, self.abort))  # fmt: skip
        for i, (name, v5) in enumerate((("plc5", True), ("plc311", False))):
            self.lines.append(Line(name, self.stack.local.port, v5, self.ledger,
                                   a.seed + 100 + i, self.stop_load, self.abort))  # fmt: skip
        self.clients += self.lines
        self.clients.append(Burst(self.stack.socket_path, self.ledger, a.burst_every,
                                  a.burst_size, self.stop_load, self.abort))  # fmt: skip
        for c in self.clients:
            c.start()
        for at, kind in schedule(self.duration, self.every):
            time.sleep(max(0.0, self.t0 + at - now()))
            self.sampler.mark(kind)
            print(f"{(now() - self.t0) / 60:5.1f} min: {kind}", flush=True)
            fault = self.injector.hit(kind, round(now() - self.t0, 1))
            self.faults.append(fault)
            print(f"        {fault.detail}; links up after {fault.recovered_s} s", flush=True)
            if not fault.ok:
                self.failures.append(f"{kind} at {fault.t:.0f} s: {fault.detail}")
                break
            if not self.stack.daemon.alive:
                break
        time.sleep(max(0.0, self.t0 + self.duration - now()))
        self.end = now() - self.t0

    def drain(self) -> None:
        """Stop the load, wait for the last answers and for the spool to empty."""
        print(f"{self.end / 60:5.1f} min: load stops; draining", flush=True)
        assert self.sampler is not None
        self.sampler.stop.set()
        self.sampler.join()
        self.stop_load.set()
        for c in [*self.clients, *self.injector.askers]:
            if not isinstance(c, Line):
                c.join(DRAIN_S)
        deadline = now() + DRAIN_S
        while now() < deadline and self.ledger.counts()["pending"] > 0:
            time.sleep(1)
        stack = self.stack
        if not stack.daemon.alive or stack.daemon_pids[-1] != stack.daemon.pid:
            self.failures.append(f"the daemon died:\n{stack.daemon.tail()}")
        deadline = max(deadline, now() + 60)
        while now() < deadline:
            status = socket_status(stack.socket_path)
            self.spool_left = status["escalation"]["spool"]["waiting"] if status else None
            if self.spool_left == 0:
                break
            time.sleep(1)
        self.abort.set()
        for line in self.lines:
            line.close()

    def check(self) -> Outcome:
        ledger, injector, failures = self.ledger, self.injector, self.failures
        asks = ledger.snapshot()
        self.dump(asks)
        accepted = [a for a in asks if ledger.accepted(a)]
        answered = [a for a in accepted if a.finals]
        lost = [a for a in accepted if not a.finals]
        duplicated = [a for a in asks if len(a.finals) > 1]
        cut_off = [a for a in asks if a.cut_off is not None and a.events == 0]
        outside = [a for a in cut_off if a.cut_off is not None and not any(
            s - 1 <= a.cut_off <= e + 1 for s, e in injector.restart_windows)]  # fmt: skip
        if lost:
            failures.append(f"{len(lost)} accepted requests never answered: "
                            f"{[a.rid for a in lost][:10]}")  # fmt: skip
        if duplicated:
            failures.append(f"{len(duplicated)} requests answered more than once: "
                            f"{[(a.rid, a.finals) for a in duplicated][:5]}")  # fmt: skip
        if outside:
            failures.append(f"{len(outside)} socket requests cut off outside a daemon restart: "
                            f"{[a.rid for a in outside][:10]}")  # fmt: skip
        wrong_malformed = [a for a in answered if a.kind == "malformed"
                           and a.finals[0].get("code") != "bad_request"]  # fmt: skip
        if wrong_malformed:
            failures.append(f"malformed requests not refused with bad_request: "
                            f"{[(a.rid, a.finals[0]) for a in wrong_malformed][:5]}")  # fmt: skip
        # Escalations not answered within their request (queued, timed out, cloud_error) must
        # end answered, or failed for a cloud_error; never stay queued or vanish.
        escalated = [a for a in answered if a.escalation.get("id")]
        outcomes: collections.Counter[str] = collections.Counter()
        unresolved = []
        if self.stack.daemon.alive:
            for a in escalated:
                if a.escalation.get("status") == "answered":
                    continue
                state = outcome_in_spool(self.work / "spool.sqlite", a.escalation["id"])
                outcomes[state] += 1
                if state not in ("answered", "failed"):
                    unresolved.append((a.rid, a.escalation.get("status"), state))
        if unresolved:
            failures.append(f"{len(unresolved)} escalations never answered by the cloud: "
                            f"{unresolved[:10]}")  # fmt: skip
        double_followups = [a.rid for a in asks if len(a.followups) > 1]
        if double_followups:
            failures.append(f"more than one cloud_answer for {double_followups[:10]}")
        # The token pieces of a streamed answer since its last `restart` are exactly done.text
        # (docs/protocol.md): a cloud answer that broke off, or that a restarted worker
        # streams again, is announced by a restart event. One exception is counted here: an MQTT
        # token event delivered twice across a local broker restart (QoS 1 is at least once,
        # and token events carry nothing to tell a repeat).
        mismatched = [a for a in answered if a.finals[0]["event"] == "done" and a.tokens
                      and "".join(a.tokens) != a.finals[0].get("text")]  # fmt: skip

        def during(a: Ask, times: list[float]) -> bool:
            return any(a.sent <= t <= (a.final_at or t) for t in times)

        repeated = [a for a in mismatched if a.transport != "socket"
                    and during(a, injector.local_broker_restarts)]  # fmt: skip
        unexplained = [a.rid for a in mismatched if a not in repeated]
        if unexplained:
            failures.append(f"{len(unexplained)} answers whose tokens are not their text: "
                            f"{unexplained[:10]}")  # fmt: skip
        leak_figures = self.check_leaks()
        figures = {
            "by_kind": dict(collections.Counter(a.kind for a in asks)),
            "busy": sum(1 for a in asks if a.busy),
            "errors_by_code": dict(collections.Counter(
                a.finals[0]["code"] for a in answered if a.finals[0]["event"] == "error")),
            "cut_off_by_daemon_restart": len(cut_off),
            "sent_on_a_closed_connection": sum(1 for a in asks if a.undelivered),
            "mqtt_never_reached_broker": sum(1 for a in asks if a.transport != "socket"
                                             and not ledger.accepted(a) and not a.busy),
            "answers_reset": sum(1 for a in answered if a.resets),
            "tokens_not_text_mqtt_repeat": len(repeated),
            "escalations_in_request_by_status": dict(collections.Counter(
                str(a.escalation.get("status")) for a in escalated)),
            "escalations_answered_later": dict(outcomes),
            **leak_figures,
        }  # fmt: skip
        return Outcome(failures, accepted, answered, lost, duplicated, figures)

    def check_leaks(self) -> dict[str, Any]:
        """Least-squares growth of RSS, fds and threads over the last two thirds: one daemon
        process (its restarts are in the first third)."""
        assert self.sampler is not None
        final_pid = self.stack.daemon_pids[-1]
        window = [r for r in self.sampler.rows if float(r["t_s"]) >= self.warm]
        pids = {r["daemon_pid"] for r in window if r["daemon_pid"] != ""}
        if pids != {final_pid}:
            self.failures.append(f"the leak window saw daemon pids {sorted(pids)}, not one")
        window = [r for r in window if r["daemon_pid"] == final_pid]
        limits = {"rss_mb": RSS_GROWTH_MAX_MB, "fds": FDS_GROWTH_MAX,
                  "threads": THREADS_GROWTH_MAX}  # fmt: skip
        figures: dict[str, Any] = {
            "leak_window_min": [round(self.warm / 60, 1), round(self.end / 60, 1)],
            "leak_limits": f"fitted growth over the window: RSS < {RSS_GROWTH_MAX_MB:g} MB, "
            f"fds <= {FDS_GROWTH_MAX:g}, threads <= {THREADS_GROWTH_MAX:g}",
        }
        for key, limit in limits.items():
            values = [float(r[key]) for r in window if r[key] != ""]
            grew = growth(window, key)
            figures[f"{key}_first_last_min_max"] = (
                [values[0], values[-1], min(values), max(values)] if values else None
            )
            figures[f"{key}_growth"] = None if grew is None else round(grew, 2)
            if grew is None:
                self.failures.append(f"too few samples to check {key} for a leak")
            elif grew >= limit if key == "rss_mb" else grew > limit:
                self.failures.append(f"leak: {key} grew by {grew:.1f} over the last two thirds "
                                     f"(limit {limit:g})")  # fmt: skip
        return figures

    def dump(self, asks: list[Ask]) -> None:
        """Every request and what came back, for the post-mortem of a failed run."""
        with open(self.work / "requests.jsonl", "w") as f:
            for a in asks:
                f.write(json.dumps({
                    "rid": a.rid, "kind": a.kind, "transport": a.transport,
                    "sent_s": round(a.sent - self.t0, 2), "undelivered": a.undelivered,
                    "cut_off_s": a.cut_off and round(a.cut_off - self.t0, 2),
                    "final_s": a.final_at and round(a.final_at - self.t0, 2),
                    "finals": a.finals, "tokens": "".join(a.tokens), "followups": a.followups,
                }) + "\n")  # fmt: skip

    def report(self, out: Outcome) -> None:
        """The summary line, the plot and the record for docs/reliability.md."""
        a, f = self.args, out.figures
        assert self.sampler is not None
        latencies = self.ledger.latencies_ms()
        local = [(x.final_at - x.sent) * 1000 for x in out.answered if x.final_at is not None
                 and x.finals[0]["event"] == "done" and x.finals[0].get("source") == "local"
                 and not x.escalation and x.kind != "prime"]  # fmt: skip
        kinds = f["by_kind"]
        fault_counts = dict(collections.Counter(x.kind for x in self.faults))
        fault_text = ", ".join(f"{n} x {k.replace('_', ' ')}" for k, n in fault_counts.items())
        rss = f["rss_mb_first_last_min_max"] or [float("nan")] * 4
        fds = f["fds_first_last_min_max"] or [float("nan")] * 4
        threads = f["threads_first_last_min_max"] or [float("nan")] * 4
        p50, p95 = pct(latencies, 50) or 0.0, pct(latencies, 95) or 0.0
        summary = (
            f"{self.end / 60:.1f} minutes, {sum(kinds.values())} requests sent "
            f"({kinds.get('escalate', 0)} escalated, {kinds.get('cancel', 0)} cancelled, "
            f"{kinds.get('malformed', 0)} malformed, {kinds.get('burst', 0)} in bursts); "
            f"{len(out.accepted)} accepted, {len(out.answered)} answered, {f['busy']} refused "
            f"with busy, {len(out.lost)} lost, {len(out.duplicated)} duplicated. Faults: "
            f"{fault_text or 'none'}. Over the last two thirds (one daemon process): RSS "
            f"{rss[0]:.0f} MB at the start, {rss[1]:.0f} MB at the end (fitted growth "
            f"{f['rss_mb_growth'] or 0:+.1f} MB, limit {RSS_GROWTH_MAX_MB:g}); open fds "
            f"{fds[2]:.0f} to {fds[3]:.0f}, threads {threads[2]:.0f} to {threads[3]:.0f}. "
            f"Answer latency p50 {p50 / 1000:.2f} s, p95 {p95 / 1000:.2f} s over the run. "
            + ("Passed." if not out.failures else f"FAILED: {'; '.join(out.failures)}")
        )
        spool = [int(r["spool_waiting"]) for r in self.sampler.rows if r["spool_waiting"] != ""]
        lp50, lp95 = pct(local, 50), pct(local, 95)
        recovery = {
            k: max(x.recovered_s or 0 for x in self.faults if x.kind == k) for k in fault_counts
        }
        figures: dict[str, Any] = {
            "summary": summary,
            "command": "make soak"
            if a.minutes == 30
            else f"scripts/soak.py --minutes {a.minutes:g}",
            "plot": rel(a.out / "soak.png"),
            "csv": rel(a.out / "soak.csv"),
            "result": "FAIL" if out.failures else "pass",
            "minutes": round(self.end / 60, 1),
            "latency_p50_ms": round(p50),
            "latency_p95_ms": round(p95),
            "local_latency_p50_ms": lp50 and round(lp50),
            "local_latency_p95_ms": lp95 and round(lp95),
            "faults": fault_counts,
            "worker_killed_mid_answer": sum(1 for x in self.faults if "mid-answer" in x.detail),
            "recovery_max_s": recovery,
            "daemon_sigterm_exit_codes": self.injector.daemon_exit_codes,
            "spool_max_waiting": max(spool, default=0),
            "spool_left_at_end": self.spool_left,
            **f,
        }
        plot(self.sampler.rows, self.faults, self.warm, a.out / "soak.png")
        record(
            "soak",
            category="soak",
            load=f"{self.end / 60:.0f} min steady: {a.terminals} socket terminals, MQTT v5 and "
            f"v3.1.1 clients, a {a.burst_size}-request burst every {a.burst_every:g} s",
            faults=fault_text,
            inputs="plain, session, escalated (flag, keyword, deep topic), cancel, malformed "
            "(invalid JSON/UTF-8, NUL, wrong types, unknown fields, bad roles), bursts",
            accepted=len(out.accepted),
            answered=len(out.answered),
            refused=out.figures["busy"],
            lost=len(out.lost),
            duplicated=len(out.duplicated),
            figures=figures,
        )
        print(summary)
        print(f"wrote {a.out / 'soak.csv'}, {a.out / 'soak.png'} and the soak record")

    def close(self, passed: bool) -> None:
        """Stop and reap every process the soak started."""
        self.stop_load.set()
        self.abort.set()
        if self.sampler is not None:
            self.sampler.stop.set()
        for line in self.lines:
            line.close()
        self.stack.stop()
        if not passed:
            for proc in (self.stack.daemon, self.stack.worker):
                print(f"--- {proc.name} log (last lines) ---\n{proc.tail()}", file=sys.stderr)
        if self.args.keep or not passed:
            print(f"work directory kept: {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fault-every", type=float, default=0.0,
                    help="seconds between faults (default: a twelfth of the run)")  # fmt: skip
    ap.add_argument("--burst-every", type=float, default=90.0)
    ap.add_argument("--burst-size", type=int, default=24)
    ap.add_argument("--terminals", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="for soak.csv and soak.png")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not shutil.which("mosquitto"):
        print("mosquitto is not installed (make soak installs it)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = models.load_manifest()
    model_file = models.fetch(manifest.get(manifest.default))
    signal.signal(signal.SIGTERM, interrupted)
    soak = Soak(args, model_file)
    print(f"soak: {args.minutes:g} min, a fault every {soak.every:.0f} s, work dir {soak.work}",
          flush=True)  # fmt: skip
    passed = False
    try:
        soak.load_and_faults()
        soak.drain()
        outcome = soak.check()
        soak.report(outcome)
        passed = not outcome.failures
        return 0 if passed else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    finally:
        soak.close(passed)


if __name__ == "__main__":
    sys.exit(main())
