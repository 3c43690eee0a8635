"""What the fault scenarios share: a TCP relay that can cut a link, a small filesystem that fills
up, the daemon's memory read from /proc, an MQTT client that timestamps every reply, and the
count of final events per request that every scenario records."""

from __future__ import annotations

import contextlib
import json
import queue
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Conn
from tests.mqtt_helpers import Requester

FINAL_EVENTS = ("done", "error")
# One inference thread: on a 2-core box the other core stays free for the brokers, the cloud
# worker, its model server and the daemon's event loop, which the faults are about.
ONE_THREAD = "[cpu]\nthreads = 1\n"


class TcpProxy:
    """A relay the test owns between a client and a server on loopback.

    `partition()` stops forwarding and holds every connection, old and new, silent, the way a
    dropped route does: neither side hears anything until its keepalive gives up. `heal()`
    closes what was held (the route's state is gone) and forwards new connections again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._peer: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []
        self._commands: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
        self.partitioned = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def partition(self) -> None:
        self._command("partition")

    def heal(self) -> None:
        self._command("heal")

    def close(self) -> None:
        if self._thread.is_alive():
            self._command("close")
            self._thread.join(5)

    def _command(self, name: str) -> None:
        done = threading.Event()
        self._commands.put((name, done))
        assert done.wait(5), f"proxy did not {name}"

    def _run(self) -> None:
        while True:
            while not self._commands.empty():
                name, done = self._commands.get()
                if name == "partition" and not self.partitioned:
                    self.partitioned = True
                    for sock in self._peer:
                        self._sel.unregister(sock)  # nothing is read, so nothing is forwarded
                elif name == "heal" and self.partitioned:
                    self._drop_all()
                    self.partitioned = False
                elif name == "close":
                    self._drop_all()
                    self._sel.close()
                    self._listener.close()
                    done.set()
                    return
                done.set()
            for key, _ in self._sel.select(0.05):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj in self._peer:  # not closed with its peer earlier in this round
                    assert isinstance(key.fileobj, socket.socket)
                    self._relay(key.fileobj)

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        self.accepted += 1
        if self.partitioned:
            self._held.append(conn)
            return
        try:
            upstream = socket.create_connection(self.upstream, 2)
        except OSError:
            conn.close()
            return
        self._peer[conn], self._peer[upstream] = upstream, conn
        self._sel.register(conn, selectors.EVENT_READ)
        self._sel.register(upstream, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        other = self._peer[sock]
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        self._close_pair(sock)

    def _close_pair(self, sock: socket.socket) -> None:
        other = self._peer.pop(sock)
        self._peer.pop(other, None)
        for s in (sock, other):
            if not self.partitioned:
                self._sel.unregister(s)
            s.close()

    def _drop_all(self) -> None:
        while self._peer:
            self._close_pair(next(iter(self._peer)))
        for s in self._held:
            s.close()
        self._held.clear()


def vm_rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int, read_only: bool = False) -> Iterator[str]:
    """A filesystem of `size_kb` mounted at `path`: a tmpfs where mounting is allowed (the suite
    runs as root), else a loop-mounted ext4 file; the test is skipped when neither works."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    tried = []
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    kind = "tmpfs"
    if res.returncode != 0:
        tried.append(f"tmpfs: {res.stderr.strip()}")
        image = path.with_name(path.name + ".img")
        kind = "loop-mounted ext4"
        res = subprocess.run(
            ["truncate", "-s", f"{max(size_kb, 1024)}k", str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode == 0 and shutil.which("mkfs.ext4"):
            res = subprocess.run(
                ["mkfs.ext4", "-q", str(image)], capture_output=True, text=True, check=False
            )
            if res.returncode == 0:
                res = subprocess.run(
                    ["mount", "-o", "loop" + (",ro" if read_only else ""), str(image), str(path)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
        if res.returncode != 0:
            tried.append(f"loop file: {res.stderr.strip() or 'mkfs.ext4 missing'}")
            pytest.skip("cannot mount a small filesystem here (" + "; ".join(tried) + ")")
    try:
        yield kind
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a file into `directory` until the filesystem has no space left; returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


class RecordingRequester(Requester):
    """A Requester that also keeps every reply with its arrival time and MQTT DUP flag."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        self.arrivals: list[tuple[float, dict[str, Any], bool]] = []
        super().__init__(port, **kwargs)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        if msg.topic == self.reply_topic:
            try:
                payload = json.loads(msg.payload)
            except ValueError:
                payload = {"raw": msg.payload.decode(errors="replace")}
            self.arrivals.append((time.monotonic(), payload, bool(msg.dup)))

    def events(self) -> list[dict[str, Any]]:
        return [payload for _, payload, _ in list(self.arrivals)]

    def wait_finals(self, ids: Iterable[str], timeout: float) -> None:
        """Until every id has a final event among the arrivals (or `timeout` passes)."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if want <= {e.get("id") for e in self.events() if e.get("event") in FINAL_EVENTS}:
                return
            time.sleep(0.05)


def finals_per_id(
    events: Iterable[dict[str, Any]], kinds: tuple[str, ...] = FINAL_EVENTS
) -> dict[Optional[str], list[dict[str, Any]]]:
    out: dict[Optional[str], list[dict[str, Any]]] = {}
    for event in events:
        if event.get("event") in kinds:
            out.setdefault(event.get("id"), []).append(event)
    return out


def tally(ids: Iterable[str], finals: dict[Optional[str], list[dict[str, Any]]]) -> dict[str, int]:
    """answered (exactly one final), lost (none), duplicated (more than one) among `ids`."""
    counts = {"answered": 0, "lost": 0, "duplicated": 0}
    for rid in ids:
        n = len(finals.get(rid, []))
        counts["answered" if n == 1 else "lost" if n == 0 else "duplicated"] += 1
    return counts


def percentile(values: list[float], pct: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))], 1)


class EventCollector(threading.Thread):
    """Reads every event of a socket connection in the background, with its arrival time."""

    def __init__(self, conn: Conn) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self._stop_reading = threading.Event()
        self.start()

    def run(self) -> None:
        self.conn.sock.settimeout(0.2)
        while not self._stop_reading.is_set():
            try:
                event = self.conn.read()
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            self.arrivals.append((time.monotonic(), event))

    def events(self) -> list[dict[str, Any]]:
        return [e for _, e in list(self.arrivals)]

    def stop(self) -> None:
        self._stop_reading.set()
        self.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def escalation_tally(ids: Iterable[str], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per request: one final event; per escalation, one cloud outcome, in the `done` (answered
    online) or as one `cloud_answer` follow-up (answered locally first: queued or timeout)."""
    finals = finals_per_id(events)
    followups = finals_per_id(events, ("cloud_answer",))
    out: dict[str, Any] = {
        "answered": 0,
        "lost": 0,
        "duplicated": 0,
        "statuses": {},
        "followups": 0,
        "cloud_answers_after_busy": 0,
        "waiting_for_cloud": [],
    }
    for rid in ids:
        got = finals.get(rid, [])
        if len(got) != 1:
            out["lost" if not got else "duplicated"] += 1
            continue
        out["answered"] += 1
        done = got[0]
        status = done.get("escalation", {}).get("status", done.get("code", "?"))
        out["statuses"][status] = out["statuses"].get(status, 0) + 1
        outcomes = len(followups.get(rid, [])) + (1 if done.get("source") == "cloud" else 0)
        for event in followups.get(rid, []):
            out["followups"] += 1
            key = f"cloud_answer {event.get('status')}"
            out["statuses"][key] = out["statuses"].get(key, 0) + 1
        if status == "busy":
            # The local fallback found the queue full, after the escalation may have been
            # stored: its cloud answer may or may not follow. Counted, not judged.
            out["cloud_answers_after_busy"] += outcomes
            continue
        expected = 1 if status in ("answered", "queued", "timeout") else 0
        if outcomes < expected:
            out["waiting_for_cloud"].append(rid)
        elif outcomes > expected:
            out["duplicated"] += 1
    return out
