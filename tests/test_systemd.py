"""systemd integration: unit files, sd_notify over a real datagram socket, socket activation,
SIGHUP reload, journald log priorities."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import openai
import pytest

from edgeagent import daemon, systemd
from tests.conftest import ROOT, Daemon, config_text, connect
from tests.mqtt_helpers import free_port
from tests.reliability import record

UNITS = ROOT / "systemd"
pytestmark = pytest.mark.skipif(
    not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed"
)


def installed_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's edgeagent, as install.sh does."""
    exe = Path(sys.executable).with_name("edgeagent")
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.glob("*.s*"):
        text = unit.read_text().replace("/opt/edgeagent/venv/bin/edgeagent", str(exe))
        (out / unit.name).write_text(text)
    return out


def test_units_verify(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(units / "edgeagent.service"),
         str(units / "edgeagent.socket"), str(units / "edgeagent-http.socket"),
         str(units / "edgeagent-cloud-worker.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [line for line in res.stderr.splitlines() if "edgeagent" in line]
    assert res.returncode == 0 and not problems, res.stderr


@pytest.mark.parametrize("unit", ["edgeagent.service", "edgeagent-cloud-worker.service"])
def test_security_exposure_is_at_most_2(unit: str) -> None:
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNITS / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(rf"Overall exposure level for {unit}: (\d+\.\d+)", res.stdout)
    assert match, res.stdout + res.stderr
    exposure = float(match.group(1))
    assert exposure <= 2.0, res.stdout
    record(
        f"systemd: exposure of {unit}",
        category="security",
        load="none (static analysis of the unit file)",
        faults="none",
        inputs="systemd-analyze security --offline=yes",
        accepted=0,
        answered=0,
        lost=0,
        duplicated=0,
        figures={"exposure": exposure, "limit": 2.0},
    )


def test_service_unit_settings() -> None:
    text = (UNITS / "edgeagent.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                    "StateDirectory=", "CacheDirectory=", "LoadCredential=mqtt-password",
                    "/etc/edgeagent/edgeagent.toml", "MemoryDenyWriteExecute=yes"):  # fmt: skip
        assert setting in text
    # /run/edgeagent is the socket unit's, and a service restart must leave the socket
    # listening (test_real_systemd shows what each did under a real systemd).
    active = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in active if line.startswith("RuntimeDirectory")]
    for name, fd_name in (("edgeagent.socket", None), ("edgeagent-http.socket", "http")):
        socket_unit = (UNITS / name).read_text().splitlines()
        assert not [line for line in socket_unit if line.startswith(("PartOf=", "BindsTo="))]
        # The daemon tells the sockets apart by their names (systemd.inherited_sockets): the
        # terminal socket's is systemd's default, its unit's own name.
        names = [line for line in socket_unit if line.startswith("FileDescriptorName=")]
        assert names == ([f"FileDescriptorName={fd_name}"] if fd_name else []), names
        assert (fd_name or name) in (systemd.HTTP_NAMES if fd_name else systemd.TERMINAL_NAMES)
    assert "Service=edgeagent.service" in (UNITS / "edgeagent-http.socket").read_text()
    # When the HTTP socket is enabled it listens before the daemon starts, or the daemon
    # would bind http.listen itself and the socket unit would find the port taken.
    after = re.search(r"^After=.*\bedgeagent-http\.socket\b", text, re.M)
    assert after, text
    # Exits that a restart cannot fix (each restart would load the model again, every 2 s).
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M)
    assert prevent, text
    lasting = {daemon.EXIT_CONFIG, daemon.EXIT_MODEL, daemon.EXIT_SPOOL}
    assert {int(code) for code in prevent.group(1).split()} == lasting


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def first(self, prefix: str) -> int:
        return next(i for i, (_, m) in enumerate(self.messages) if any(
            line.startswith(prefix) for line in m.splitlines()))  # fmt: skip

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.splitlines()]


def test_sd_notify_ready_status_watchdog_stopping(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    d = Daemon(tmp_path, config_text(engine_extra="stall_timeout_s = 0.5")).start()
    try:
        notify.pump(1.0)
        ready = notify.first("READY=1")
        assert "STATUS=ready: queue 0/8" in notify.messages[ready][1]
        pings_before = [t for t in notify.times("WATCHDOG=1") if t > notify.messages[ready][0]]
        assert len(pings_before) >= 3
        # A prompt of ~900 tokens keeps the engine in one llama.cpp call for seconds, far
        # past stall_timeout_s: the watchdog must stop being fed, then resume.
        with connect(d.socket_path) as c:
            c.send({"id": "slow", "prompt": "belts move boxes " * 300, "max_tokens": 2})
            t_sent = time.monotonic()
            received = b""
            deadline = time.monotonic() + 120
            while b'"event":"done"' not in received and time.monotonic() < deadline:
                notify.pump(0.2)
                with contextlib.suppress(BlockingIOError):
                    received += c.sock.recv(65536, socket.MSG_DONTWAIT)
            t_done = time.monotonic()
            assert b'"event":"done"' in received
        notify.pump(1.0)
        pings = [t for t in notify.times("WATCHDOG=1") if t_sent <= t <= t_done]
        gaps = [b - a for a, b in zip([t_sent, *pings], [*pings, t_done])]
        assert max(gaps) > 1.0, gaps  # pings stopped while the engine was stuck
        assert [t for t in notify.times("WATCHDOG=1") if t > t_done]  # and came back
        assert "no longer feeding the watchdog" in d.log()
        assert d.stop() == 0
        notify.pump(0.3)
    finally:
        d.stop()
    stopping = notify.first("STOPPING=1")
    assert ready < stopping
    assert notify.first("WATCHDOG=1") > ready
    # Under journald every line carries its syslog priority.
    assert re.search(r"^<6>INFO edgeagent: edgeagent .* ready in", d.log(), re.M)
    assert re.search(r"^<3>ERROR edgeagent: engine made no progress", d.log(), re.M)


def test_socket_activation_with_systemd_socket_activate(tmp_path: Path, model_file: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("systemd-socket-activate is not installed")
    sock = tmp_path / "activated.sock"
    cfg = tmp_path / "a.toml"
    # The config names another path: an inherited socket must win over binding our own.
    cfg.write_text(config_text().replace("@SOCKET@", str(tmp_path / "unused.sock")))
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [tool, "-l", str(sock), sys.executable, "-m", "edgeagent", "run", "--config",
             str(cfg)], stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # systemd-socket-activate starts the daemon on the first connection; the connection
        # waits in the listen backlog until the model is loaded.
        with connect(str(sock), timeout=120) as c:
            c.send({"id": "sa", "prompt": "Say OK.", "max_tokens": 4})
            assert c.until_final("sa")[-1]["event"] == "done"
        assert not (tmp_path / "unused.sock").exists()
        assert "listening on inherited socket" in (tmp_path / "daemon.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def socket_activate(tmp_path: Path, config: str, listen: list[str], names: list[str],
                    log_name: str = "daemon.log") -> subprocess.Popen[bytes]:  # fmt: skip
    """The daemon under systemd-socket-activate with these listeners and FileDescriptorName=s;
    it starts on the first connection to any of them."""
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("systemd-socket-activate is not installed")
    cfg = tmp_path / "a.toml"
    cfg.write_text(config)
    args = [tool, *(f"--listen={address}" for address in listen), f"--fdname={':'.join(names)}"]
    with open(tmp_path / log_name, "wb") as log:
        return subprocess.Popen(
            [*args, sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def test_systemd_passes_the_terminal_and_http_sockets_by_name(tmp_path: Path) -> None:
    sock = tmp_path / "terminal.sock"
    port = free_port()
    text = config_text().replace("@SOCKET@", str(tmp_path / "unused.sock"))
    configured = re.search(r'listen = "127\.0\.0\.1:(\d+)"', text)
    assert configured, text
    # HTTP first: the order of the sockets says nothing, their names do.
    proc = socket_activate(
        tmp_path, text, [f"127.0.0.1:{port}", str(sock)], ["http", "edgeagent.socket"]
    )
    try:
        wait_listening(port)
        with connect(str(sock), timeout=120) as c:  # starts the daemon; waits for the model
            c.send({"id": "t", "prompt": "Say OK.", "max_tokens": 4})
            assert c.until_final("t")[-1]["event"] == "done"
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                            max_retries=0, timeout=120)  # fmt: skip
        answer = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Say OK."}], max_tokens=4
        )
        assert answer.choices[0].message.content
        # systemd's listeners replace http.listen, and the configured socket path is unused.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(configured.group(1))), timeout=5)
        assert not (tmp_path / "unused.sock").exists()
        log = (tmp_path / "daemon.log").read_text()
        assert "listening on inherited socket" in log
        assert "HTTP on the listeners systemd passed" in log
        assert "no front end uses" not in log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize(
    ("address", "extra", "reason"),
    [
        ("0.0.0.0", "", "http.api_keys_file: systemd passes a listener on 0.0.0.0:{port} "
                        "(edgeagent-http.socket), which other machines reach"),
        ("127.0.0.1", "\n[http]\nenabled = false\n",
         "http.enabled: false, but systemd passes HTTP listeners"),
    ],
    ids=["reachable-without-keys", "http-disabled"],
)  # fmt: skip
def test_an_http_listener_the_config_cannot_serve_fails_the_start(
    tmp_path: Path, address: str, extra: str, reason: str
) -> None:
    port = free_port()
    text = config_text(http=False).replace("@SOCKET@", str(tmp_path / "t.sock")) + extra
    proc = socket_activate(tmp_path, text, [f"{address}:{port}"], ["http"])
    try:
        wait_listening(port)  # the connection starts the daemon, which refuses the listener
        assert proc.wait(60) == daemon.EXIT_CONFIG
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert f"{tmp_path / 'a.toml'}: " + reason.format(port=port) in log, log
    assert not (tmp_path / "t.sock").exists()


def test_a_reload_keeps_the_keys_of_a_listener_other_machines_reach(tmp_path: Path) -> None:
    """Emptying the keys file and reloading would let anyone in as a loopback client (a Host
    header is all that checks): the daemon keeps the keys it had while systemd's listener
    reaches other machines, as config.py refuses it for http.listen."""
    key = "kiosk-0123456789abcdef"
    keys = tmp_path / "http-api-keys"
    keys.write_text(f"kiosk: {key}\n")
    keys.chmod(0o600)
    port = free_port()
    text = config_text(http=False).replace("@SOCKET@", str(tmp_path / "t.sock"))
    proc = socket_activate(tmp_path, text + f'\n[http]\napi_keys_file = "{keys}"\n',
                           [f"0.0.0.0:{port}"], ["http"])  # fmt: skip

    def get(path: str, headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path, headers={"Host": "localhost", **headers})
        status = conn.getresponse().status
        conn.close()
        return status

    def models(headers: dict[str, str]) -> int:
        return get("/v1/models", headers)

    try:
        wait_listening(port)
        deadline = time.monotonic() + 120
        while get("/health", {}) != 200:  # loading: SIGHUP is handled once it is ready
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert models({"Authorization": f"Bearer {key}"}) == 200
        assert models({}) == 401
        keys.write_text("# every kiosk removed\n")
        proc.send_signal(signal.SIGHUP)
        log = tmp_path / "daemon.log"
        deadline = time.monotonic() + 30
        while "config reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert (
            f"reload: http.api_keys_file: no keys left, but 0.0.0.0:{port} is reachable from "
            "other machines; the 1 key(s) from before the reload stay"
        ) in log.read_text()
        assert models({}) == 401
        assert models({"Authorization": f"Bearer {key}"}) == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_sighup_reloads_what_it_can_and_names_what_needs_a_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    with connect(d.socket_path) as c:
        assert c.op("status")["queue_size"] == 8
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace("queue_size = 8", "queue_size = 3").replace("n_ctx = 2048", "n_ctx = 1024")
        + '[log]\nlevel = "debug"\n'
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    with connect(d.socket_path) as c:
        status = c.op("status")
    assert status["queue_size"] == 3
    assert status["model"]["n_ctx"] == 2048  # unchanged until a restart ...
    assert "reload: model.n_ctx changed; it takes effect after a restart" in d.log()  # ... said
    # An invalid file is refused whole; the daemon keeps running on the old config.
    d.config_path.write_text(text + "[cpu]\nbogus = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload refused" in d.log() and "cpu.bogus: unknown key" in d.log()
    with connect(d.socket_path) as c:
        assert c.op("status")["queue_size"] == 3
    assert d.stop() == 0
    assert os.path.exists(d.config_path)


def test_sighup_always_ends_in_ready_even_when_the_reload_fails(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd holds the unit in "reloading" from RELOADING=1 until READY=1: a reload that
    fails in a way nobody foresaw must still end in READY=1, on the old config."""
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    d = Daemon(tmp_path, config_text()).start()
    proc = d.proc
    assert proc is not None
    text = d.config_path.read_text()

    def reload() -> list[str]:
        """The notification lines from the next RELOADING=1 on (waits for a READY=1)."""
        seen = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while "READY=1" not in lines and time.monotonic() < deadline:
            notify.pump(0.1)
            lines = [line for _, m in notify.messages[seen:] for line in m.splitlines()]
            lines = lines[lines.index("RELOADING=1") :] if "RELOADING=1" in lines else []
        return lines

    try:
        notify.pump(0.3)
        # Nested deeper than the TOML parser can recurse: not a ConfigError but an exception
        # from inside the reload itself.
        d.config_path.write_text(text + "deep = " + "[" * 5000 + "]" * 5000 + "\n")
        lines = reload()
        assert lines[:1] == ["RELOADING=1"] and "READY=1" in lines, lines
        assert re.search(r"reload (failed|refused)", d.log()), d.log()
        with connect(d.socket_path) as c:
            assert c.op("status")["queue_size"] == 8  # the old config, still serving
        # ... and the next good file is taken as before.
        d.config_path.write_text(text.replace("queue_size = 8", "queue_size = 3"))
        lines = reload()
        assert lines[:1] == ["RELOADING=1"] and "READY=1" in lines, lines
        with connect(d.socket_path) as c:
            assert c.op("status")["queue_size"] == 3
        assert d.stop() == 0
    finally:
        d.stop()


MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "edgeagent", *sys.argv[1:]])
"""


def test_daemon_needs_no_writable_executable_memory(tmp_path: Path, model_file: Path) -> None:
    """What MemoryDenyWriteExecute=yes enforces, applied by the kernel (PR_SET_MDWE)."""
    probe = subprocess.run([sys.executable, "-c", MDWE_WRAPPER, "--version"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    sock = tmp_path / "mdwe.sock"
    cfg = tmp_path / "m.toml"
    cfg.write_text(config_text().replace("@SOCKET@", str(sock)))
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", MDWE_WRAPPER, "run", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        with connect(str(sock)) as c:
            c.send({"id": "wx", "prompt": "Say OK.", "max_tokens": 4})
            assert c.until_final("wx")[-1]["event"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
