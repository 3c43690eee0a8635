"""Shared fixtures: the real model from the cache and real daemon processes on real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from edgeagent import models
from tests.mqtt_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The default model, fetched into the cache by `make test` before pytest runs."""
    manifest = models.load_manifest()
    spec = manifest.get(manifest.default)
    return models.fetch(spec)


def http_section(port: int) -> str:
    """The [http] table of a test daemon: its own free port, never the default 8080."""
    return f'\n[http]\nlisten = "127.0.0.1:{port}"\n'


def with_http(config_text: str) -> tuple[str, int]:
    """The config with an [http] table on a free port unless it has one; and that port (0
    when the config's own table says nothing the tests can find)."""
    if "[http]" not in config_text:
        port = free_port()
        return config_text + http_section(port), port
    found = re.search(r'listen\s*=\s*\[?\s*"127\.0\.0\.1:(\d+)"', config_text)
    return config_text, int(found.group(1)) if found else 0


class Daemon:
    """A real `edgeagent run` process with its own config, socket, HTTP port and log file."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.workdir = workdir
        self.socket_path = str(workdir / "edgeagent.sock")
        self.config_path = workdir / "edgeagent.toml"
        config_text, self.http_port = with_http(config_text)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.config_path.write_text(config_text.replace("@SOCKET@", self.socket_path))
        self.log_path = workdir / "daemon.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.ready_s: Optional[float] = None

    def start(self) -> Daemon:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "run", "--config", str(self.config_path)],
                cwd=self.workdir,
                # Prompt-prefix snapshots go to the daemon's own cache, its knowledge base and
                # spool to its own state directory, as under systemd.
                env={
                    **os.environ,
                    "CACHE_DIRECTORY": str(self.workdir / "cache"),
                    "XDG_STATE_HOME": str(self.workdir / "state"),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = t0 + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with connect(self.socket_path) as conn:
                    if conn.op("status")["event"] == "status":
                        self.ready_s = time.monotonic() - t0
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Process:
    """A background process with its log file, reaped by the fixture that starts it."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log_path = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def openai_stand_in(model_file: Path, log: Path, alias: str, *args: str) -> tuple[Process, int]:
    """llama-cpp-python's OpenAI-compatible server on the local model, standing in for the
    cloud's vLLM/TGI; returns once it answers, with its port."""
    port = free_port()
    server = Process(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file), "--host",
         "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
         "--model_alias", alias, *args],
        log,
    ).start()  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close()
            return server, port
        except urllib.error.HTTPError:
            return server, port  # up, and asking for its API key
        except OSError:
            assert time.monotonic() < deadline, server.log()
            assert server.proc is not None and server.proc.poll() is None, server.log()
            time.sleep(0.2)


class Conn:
    """A raw JSON-lines connection, for tests that need to send malformed bytes."""

    def __init__(self, path: str, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: Any) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the daemon")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event

    def op(self, name: str, **fields: Any) -> dict[str, Any]:
        self.send({"op": name, **fields})
        while True:
            event = self.read()
            if event["event"] in (name, "error"):
                return event

    def until_final(self, rid: str) -> list[dict[str, Any]]:
        """Every event for `rid` up to its final one (events of other ids are skipped)."""
        out = []
        while True:
            event = self.read()
            if event.get("id") != rid:
                continue
            out.append(event)
            if event["event"] in ("done", "error"):
                return out

    def collect(self, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        """Read until every id in `ids` has its final event."""
        out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        open_ids = set(ids)
        while open_ids:
            event = self.read()
            rid = event.get("id")
            if rid in out:
                out[rid].append(event)
                if event["event"] in ("done", "error"):
                    open_ids.discard(rid)
        return out


def connect(path: str, timeout: float = 60) -> Conn:
    return Conn(path, timeout)


BASE_CONFIG = """
node_id = "{node_id}"
[model]
n_ctx = {n_ctx}
max_tokens = 256
temperature = 0.0
[engine]
queue_size = {queue_size}
{engine_extra}
[socket]
path = "@SOCKET@"
"""


def config_text(
    n_ctx: int = 2048,
    queue_size: int = 8,
    node_id: str = "test-node",
    engine_extra: str = "",
    http: bool = True,
) -> str:
    """A test daemon's config (with @SOCKET@ for its socket path), HTTP on a free port unless
    `http` is False (for a test that writes its own [http] table). [socket] stays the last
    table, for the tests that add keys to it."""
    text = BASE_CONFIG.format(
        n_ctx=n_ctx, queue_size=queue_size, node_id=node_id, engine_extra=engine_extra
    )
    if not http:
        return text
    return text.replace("\n[socket]\n", http_section(free_port()) + "[socket]\n", 1)


@pytest.fixture(scope="session")
def daemon_factory(
    model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(
        n_ctx: int = 2048,
        queue_size: int = 8,
        extra: str = "",
        node_id: str = "test-node",
        engine_extra: str = "",
    ) -> Daemon:
        workdir = tmp_path_factory.mktemp("daemon")
        text = config_text(n_ctx, queue_size, node_id, engine_extra)
        d = Daemon(workdir, text + extra)
        started.append(d)
        return d.start()

    yield make
    # Every daemon is told to stop first, then waited for: one by one, forty daemons' drains
    # took half a minute of the suite.
    running = [d for d in started if d.proc is not None and d.proc.poll() is None]
    for d in running:
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
    for d in running:
        d.stop()


def kb_add(db: Path, doc: Path, collection: str, config: Optional[Path] = None) -> None:
    """`edgeagent kb add`, the real command, into the knowledge base `db`."""
    command = [sys.executable, "-m", "edgeagent", "kb", "add", str(doc)]
    command += ["--collection", collection, "--db", str(db)]
    command += ["--config", str(config)] if config is not None else []
    subprocess.run(command, check=True, capture_output=True, timeout=120)


# A kiosk's manual whose passage holds markup: shown as text like the model's words.
LABELS_MD = """# Labeller L2 manual

## Label roll change

Change the label roll when the low-roll lamp is lit. Thread the web under the
<img src=x onerror="window.pwned=1"> peel plate, then press RESET twice.
"""


@pytest.fixture(scope="session")
def manuals(
    daemon_factory: Callable[..., Daemon], model_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Daemon, Path]:  # fmt: skip
    """A box whose HTTP requests are answered from its manuals unless they say otherwise,
    with vectors (the model itself as the embedding model): the labeller's manual and the
    filler's (tests/test_kb.py), loaded by `edgeagent kb add` with the box's config."""
    from tests.test_kb import MANUAL_MD  # noqa: PLC0415

    work = tmp_path_factory.mktemp("manuals")
    (work / "labeller.md").write_text(LABELS_MD)
    (work / "filler.md").write_text(MANUAL_MD)
    cfg = work / "kb.toml"
    cfg.write_text(f'[kb]\nembedding_model = "{model_file}"\n')
    for doc, collection in (("labeller.md", "line-2"), ("filler.md", "line-3")):
        kb_add(work / "kb.sqlite", work / doc, collection, config=cfg)
    extra = (f'[kb]\npath = "{work / "kb.sqlite"}"\nfront_ends = ["http"]\n'
             f'embedding_model = "{model_file}"\n')  # fmt: skip
    return daemon_factory(node_id="kiosk-kb", extra=extra), work


@pytest.fixture(scope="session")
def manuals_daemon(manuals: tuple[Daemon, Path]) -> Daemon:
    return manuals[0]


@pytest.fixture(scope="session")
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """The shared daemon most end-to-end tests talk to."""
    return daemon_factory()


@pytest.fixture
def conn(daemon: Daemon) -> Iterator[Conn]:
    with connect(daemon.socket_path) as c:
        yield c


def env_without_sockets() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EDGEAGENT_SOCKET", None)
    return env
