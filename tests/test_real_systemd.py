"""edgeagent under a real systemd.

A Debian box boots with systemd as PID 1 (tests/container.py: systemd-nspawn over a throwaway
overlay of a cached mmdebstrap tree). scripts/install.sh sets it up as an operator would, and
the tests drive it with systemctl and real clients: the socket's path is reached from here
through /proc/<the box's init>/root, the brokers and the cloud's model server run here on
loopback, which the box shares.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.cpu import thread_affinities
from tests import container
from tests.conftest import ROOT, Conn, openai_stand_in
from tests.container import Box
from tests.mqtt_helpers import Broker, free_port
from tests.reliability import record

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="booting a container (mount, systemd-nspawn) needs root; CI runs as root",
    ),
    pytest.mark.skipif(
        container.inside_a_box(),
        reason="already inside a systemd-nspawn box (scripts/fresh_box.py): a box inside it "
        "does not start on these machines ('Failed to create /../payload subcgroup'); the "
        "real-systemd tests run on the host",
    ),
    pytest.mark.timeout(900),
]

SOCK = "/run/edgeagent/edgeagent.sock"
CONFIG = "/etc/edgeagent/edgeagent.toml"
DROP_IN = "/etc/systemd/system/edgeagent.service.d/test.conf"
HTTP_SOCKET_DROP_IN = "/etc/systemd/system/edgeagent-http.socket.d/test.conf"
INSTALL = "/root/edgeagent/scripts/install.sh"
STAND_IN = "llama3-8b-stand-in"


def base_config(**engine: Any) -> str:
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in engine.items())
    return f'node_id = "box-edge"\n[model]\nmax_tokens = 64\ntemperature = 0.0\n[engine]\n{lines}'


def seed(box: Box, model_file: Path) -> None:
    """What an operator brings to a new box: this checkout (its tracked and new files), and,
    so the test does not download them again, the llama.cpp wheel this machine built and the
    verified model (the installer still checks its sha256)."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    dest = box.path("/root/edgeagent")
    dest.mkdir(parents=True)
    existing = b"\0".join(f for f in files.split(b"\0") if f and (ROOT / f.decode()).exists())
    pack = subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], input=existing,
                          cwd=ROOT, capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-xf", "-", "-C", str(dest)], input=pack.stdout, check=True)
    wheels = box.path("/var/cache/edgeagent-build/edgeagent/wheels")
    wheels.mkdir(parents=True)
    for key in (container.cache_root().parent / "wheels").iterdir():
        if key.is_dir() and ".tmp." not in key.name:  # not a build of scripts/build-llama.sh
            subprocess.run(["cp", "-r", str(key), str(wheels)], check=True)
    models = box.path("/var/lib/edgeagent/models")
    models.mkdir(parents=True)
    subprocess.run(["cp", str(model_file), str(models)], check=True)


@pytest.fixture(scope="module")
def box(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    missing = container.missing_tools()
    assert not missing, f"not installed: {missing} (make test installs them)"
    work = tmp_path_factory.mktemp("box")
    b = Box(container.tree(work / "mmdebstrap.log"), work)
    try:
        b.boot()
        seed(b, model_file)
        # The cloud worker's installer first, on a box that never saw the edge's: it makes the
        # venv itself and waits for worker.toml before starting anything.
        first = b.run("bash", INSTALL, "--worker", timeout=900)
        assert "write /etc/edgeagent/worker.toml" in first.stdout, first.stdout
        assert b.path("/opt/edgeagent/venv/bin/edgeagent").is_file()
        assert not b.path("/etc/systemd/system/edgeagent.service").exists()
        b.run("bash", INSTALL, timeout=900)
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def edge(box: Box) -> Iterator[Box]:
    """The box with the edge service running on the test config; put back after each test."""
    configure(box, base_config())
    yield box
    if box.path(DROP_IN).exists():
        box.path(DROP_IN).unlink()
        box.systemctl("daemon-reload")
    box.systemctl("reset-failed", "edgeagent.service", check=False)
    configure(box, base_config())


def configure(box: Box, text: str) -> None:
    box.path(CONFIG).write_text(text)
    box.run("/opt/edgeagent/venv/bin/edgeagent", "config", "check", CONFIG)
    box.systemctl("restart", "edgeagent.service")
    wait_active(box)


def drop_in(box: Box, service_lines: str) -> None:
    """A drop-in for edgeagent.service (the `edge` fixture removes it after the test)."""
    box.path(DROP_IN).parent.mkdir(exist_ok=True)
    box.path(DROP_IN).write_text(f"[Service]\n{service_lines}\n")
    box.systemctl("daemon-reload")


def wait_active(box: Box, unit: str = "edgeagent.service") -> None:
    wait_for(lambda: box.systemctl("is-active", unit, check=False) == "active", what=unit)


def wait_for(condition: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.2)


def ask(box: Box, rid: str, prompt: str = "Name one metal.", max_tokens: int = 4,
        **fields: Any) -> list[dict[str, Any]]:  # fmt: skip
    with Conn(str(box.path(SOCK)), timeout=120) as c:
        c.send({"id": rid, "prompt": prompt, "max_tokens": max_tokens, **fields})
        return c.until_final(rid)


def main_pid(box: Box) -> int:
    return int(box.show("edgeagent.service", "MainPID"))


def exposure(box: Box, unit: str) -> float:
    out = box.run("systemd-analyze", "security", "--no-pager", unit).stdout
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out)
    assert m, out
    return float(m.group(1))


def test_install_sh_leaves_a_hardened_service_that_only_the_terminal_group_reaches(
    edge: Box,
) -> None:
    assert edge.systemctl("is-active", "edgeagent.socket") == "active"
    assert ask(edge, "hello")[-1]["event"] == "done"
    st = os.stat(edge.path(SOCK))
    uid = int(edge.run("id", "-u", "edgeagent").stdout)
    gid = int(edge.run("getent", "group", "edgeagent-clients").stdout.split(":")[2])
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o660)
    run_dir = os.stat(edge.path("/run/edgeagent"))  # the socket unit's: root's, anyone may look
    assert (run_dir.st_uid, run_dir.st_mode & 0o777) == (0, 0o755)
    edge.run("useradd", "--create-home", "terminal")
    edge.run("useradd", "--create-home", "visitor")
    edge.run("usermod", "-aG", "edgeagent-clients", "terminal")
    probe = (
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({SOCK!r}); "
        's.sendall(b\'{"op": "status"}\\n\'); print(s.makefile().readline())'
    )
    terminal = edge.run("runuser", "-u", "terminal", "--", "python3", "-c", probe)
    assert json.loads(terminal.stdout)["event"] == "status"
    visitor = edge.run("runuser", "-u", "visitor", "--", "python3", "-c", probe, check=False)
    assert visitor.returncode != 0 and "PermissionError" in visitor.stderr
    # The sandbox as the installed units have it, scored by systemd itself.
    assert exposure(edge, "edgeagent.service") <= 2.0
    assert exposure(edge, "edgeagent-cloud-worker.service") <= 2.0


def test_the_first_connection_starts_the_service_and_is_answered(edge: Box) -> None:
    edge.systemctl("stop", "edgeagent.service")
    assert edge.systemctl("is-active", "edgeagent.service", check=False) == "inactive"
    assert edge.systemctl("is-active", "edgeagent.socket") == "active"
    since = time.time()
    events = ask(edge, "activated")
    assert events[-1]["event"] == "done", events
    assert edge.systemctl("is-active", "edgeagent.service") == "active"
    assert "listening on inherited socket" in edge.journal("edgeagent.service", since)


def test_restart_while_terminals_connect_refuses_none_and_answers_every_request(
    edge: Box,
) -> None:
    outcomes: list[tuple[str, str]] = []
    stop = threading.Event()

    def terminal(name: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            rid = f"{name}-{n}"
            try:
                final = ask(edge, rid)[-1]
                what = final["event"]
                if what != "done":
                    what = f"error {final.get('code')}: {final.get('message')}"
                outcomes.append((rid, what))
            except (OSError, EOFError) as exc:
                outcomes.append((rid, f"{type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=terminal, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        pids = [main_pid(edge)]
        # Two restarts by hand, then an upgrade: install.sh run again restarts the service.
        restarts = [("systemctl", "restart", "edgeagent.service")] * 2 + [("bash", INSTALL)]
        for restart in restarts:
            more_answers(outcomes)
            edge.run(*restart, timeout=900)
            pids.append(main_pid(edge))
        more_answers(outcomes)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert len(set(pids)) == 4, pids  # three real restarts
    assert 0 not in pids
    failed = [o for o in outcomes if o[1] != "done"]
    assert not failed, (failed, len(outcomes))
    assert edge.systemctl("is-active", "edgeagent.socket") == "active"
    assert len({rid for rid, _ in outcomes}) == len(outcomes)
    record(
        "systemd: restarts while terminals connect",
        category="process",
        load="3 terminals connecting in a loop, one 4-token request per connection",
        faults="systemctl restart x2, then an upgrade (install.sh again), under systemd as PID 1",
        inputs="valid requests",
        accepted=len(outcomes),
        answered=len(outcomes) - len(failed),
        lost=0,
        duplicated=0,
        figures={"restarts": 3, "instances": len(set(pids)), "refused_connections": 0},
    )


def more_answers(outcomes: list[Any], count: int = 6) -> None:
    target = len(outcomes) + count
    wait_for(lambda: len(outcomes) >= target, what=f"{count} more answers")


def kiosk_ask(port: int, seen: dict[str, int]) -> str:
    """One chat completion as a kiosk asks it (a new connection each), retried as a stock
    OpenAI client does on a 503 with Retry-After (loading, stopping); counts what it saw."""
    body = json.dumps({"model": "m", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Name one metal."}]})  # fmt: skip
    for _ in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip
            resp = conn.getresponse()
            data = json.loads(resp.read())
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if resp.status == 200:
            return "done" if data["choices"][0]["message"]["content"] else f"empty: {data}"
        code = data["error"]["code"]
        if resp.status != 503 or code not in ("loading", "stopping"):
            return f"{resp.status} {code}: {data['error']['message']}"
        seen[code] = seen.get(code, 0) + 1
        time.sleep(float(resp.getheader("Retry-After") or 1))
    return "still 503 after 60 tries"


def test_the_http_socket_keeps_kiosks_connected_through_restarts(edge: Box) -> None:
    port = free_port()
    drop = edge.path(HTTP_SOCKET_DROP_IN)
    drop.parent.mkdir(exist_ok=True)
    drop.write_text(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    edge.systemctl("daemon-reload")
    # As docs/deploy.md has it: one call, the service first.
    edge.systemctl("enable", "edgeagent-http.socket")
    edge.systemctl("restart", "edgeagent.service", "edgeagent-http.socket")
    assert edge.systemctl("is-active", "edgeagent-http.socket") == "active"
    try:
        seen: dict[str, int] = {}
        edge.systemctl("stop", "edgeagent.service")
        since = time.time()
        # The service is stopped: a kiosk's request starts it and is answered.
        assert kiosk_ask(port, seen) == "done"
        assert edge.systemctl("is-active", "edgeagent.service") == "active"
        assert "HTTP on the listeners systemd passed" in edge.journal("edgeagent.service", since)
        outcomes: list[str] = []
        stop = threading.Event()

        def kiosk() -> None:
            while not stop.is_set():
                outcomes.append(kiosk_ask(port, seen))

        threads = [threading.Thread(target=kiosk) for _ in range(2)]
        for t in threads:
            t.start()
        pids = [main_pid(edge)]
        try:
            for _ in range(2):
                more_answers(outcomes, 4)
                edge.systemctl("restart", "edgeagent.service")
                pids.append(main_pid(edge))
            more_answers(outcomes, 4)
        finally:
            stop.set()
            for t in threads:
                t.join(150)
        assert len(set(pids)) == 3, pids
        failed = [o for o in outcomes if o != "done"]
        assert not failed, (failed, len(outcomes))
        assert edge.systemctl("is-active", "edgeagent-http.socket") == "active"
        assert exposure(edge, "edgeagent.service") <= 2.0
    finally:
        edge.systemctl("disable", "edgeagent-http.socket")
        edge.systemctl("stop", "edgeagent-http.socket")
        drop.unlink()
        edge.systemctl("daemon-reload")
        edge.systemctl("restart", "edgeagent.service")  # binds [http] listen again
    record(
        "systemd: restarts while kiosks ask over HTTP (edgeagent-http.socket)",
        category="process",
        load="2 kiosks asking in a loop, one 4-token chat completion per connection",
        faults="systemctl restart x2, under systemd as PID 1, with the HTTP socket enabled",
        inputs="valid requests",
        accepted=len(outcomes),
        answered=len(outcomes),
        lost=0,
        duplicated=0,
        figures={"restarts": 2, "refused_connections": 0, "retried_503_loading":
                 seen.get("loading", 0), "retried_503_stopping": seen.get("stopping", 0)},
    )  # fmt: skip


def test_reload_applies_a_safe_change_and_reports_ready_again(edge: Box) -> None:
    pid = main_pid(edge)
    assert ask(edge, "before", "Count from 1 to 30.", max_tokens=20)[-1]["usage"][
        "completion_tokens"] > 3  # fmt: skip
    edge.path(CONFIG).write_text(base_config().replace("max_tokens = 64", "max_tokens = 3"))
    edge.run("systemd-analyze", "log-level", "debug")
    since = time.time()
    try:
        edge.systemctl("reload", "edgeagent.service")
        wait_for(lambda: "config reloaded" in edge.journal("edgeagent.service", since))
        wait_for(lambda: edge.show("edgeagent.service", "ActiveState") == "active")
    finally:
        edge.run("systemd-analyze", "log-level", "info")
    done = ask(edge, "after", "Count from 1 to 30.", max_tokens=3)[-1]
    assert done["event"] == "done" and done["usage"]["completion_tokens"] == 3, done
    with Conn(str(edge.path(SOCK))) as c:  # the new ceiling: a larger ask is refused
        c.send({"id": "over", "prompt": "hi", "max_tokens": 20})
        over = c.until_final("over")[-1]
    assert over["event"] == "error" and over["code"] == "bad_request", over
    assert main_pid(edge) == pid  # reloaded, not restarted
    notes = [line for line in edge.journal("edgeagent.service", since).splitlines()
             if "Got notification message" in line]  # fmt: skip
    reloading = [i for i, line in enumerate(notes) if "RELOADING=1" in line]
    ready = [i for i, line in enumerate(notes) if "READY=1" in line]
    assert reloading and ready and ready[-1] > reloading[0], notes


def test_stop_with_requests_in_flight_answers_each_and_exits_zero(edge: Box) -> None:
    conns = [Conn(str(edge.path(SOCK)), timeout=120) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            c.send({"id": f"s{i}", "prompt": "Write a long story about a lathe.",
                    "max_tokens": 64})  # fmt: skip
        for c in conns:  # each is being answered or waits its turn
            first = c.read()
            assert first["event"] in ("token", "queued"), first
        edge.systemctl("stop", "edgeagent.service")
        finals = [c.until_final(f"s{i}")[-1] for i, c in enumerate(conns)]
        for c in conns:  # exactly one final event each: nothing more, then the close
            with pytest.raises(EOFError):
                c.read()
    finally:
        for c in conns:
            c.close()
    for f in finals:
        assert f["event"] == "done" or (f["event"] == "error" and f["code"] == "cancelled"), f
    assert edge.show("edgeagent.service", "ExecMainStatus") == "0"
    assert edge.show("edgeagent.service", "Result") == "success"
    assert "Traceback" not in edge.journal("edgeagent.service")
    record(
        "systemd: systemctl stop with requests in flight",
        category="process",
        load="3 requests of up to 64 tokens, each on its own connection",
        faults="systemctl stop edgeagent.service once all three are under way",
        inputs="valid requests",
        accepted=len(finals),
        answered=len(finals),
        lost=0,
        duplicated=0,
        figures={"done": sum(f["event"] == "done" for f in finals), "exit_status": 0},
    )


def test_an_invalid_config_fails_the_start_once_with_its_key(edge: Box) -> None:
    restarts = int(edge.show("edgeagent.service", "NRestarts"))
    edge.path(CONFIG).write_text(base_config(queue_size=0))
    since = time.time()
    assert edge.run("systemctl", "restart", "edgeagent.service", check=False).returncode != 0
    wait_for(lambda: edge.show("edgeagent.service", "ActiveState") == "failed")
    time.sleep(3)  # past RestartSec=2s: RestartPreventExitStatus= keeps it down
    assert edge.show("edgeagent.service", "ActiveState") == "failed"
    assert edge.show("edgeagent.service", "ExecMainStatus") == "2"
    assert int(edge.show("edgeagent.service", "NRestarts")) == restarts
    assert "engine.queue_size" in edge.journal("edgeagent.service", since)


def stop_threads(tids: list[int]) -> subprocess.Popen[str]:
    """Stop these threads, not their process: what a hung llama.cpp call looks like from
    outside. ptrace(PTRACE_SEIZE) then PTRACE_INTERRUPT; SIGSTOP would stop every thread, the
    event loop that feeds the watchdog too. The tracer stays until the tracees end."""
    code = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
tids = [int(t) for t in sys.argv[1:]]
for tid in tids:
    for request in (0x4206, 0x4207):  # PTRACE_SEIZE, PTRACE_INTERRUPT
        if libc.ptrace(request, tid, None, None) != 0:
            sys.exit(f"ptrace {request:#x} {tid}: {os.strerror(ctypes.get_errno())}")
    os.waitpid(tid, 0x40000000)  # __WALL: it is stopped
print("stopped", flush=True)
left = set(tids)
while left:  # reap them when the watchdog's kill ends them, or their process stays a zombie
    try:
        tid, status = os.waitpid(-1, 0x40000000)
    except ChildProcessError:
        break
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        left.discard(tid)
    else:
        libc.ptrace(0x4203, tid, None, None)  # PTRACE_CONT past any other stop
"""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, tids)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "stopped", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def test_the_watchdog_restarts_a_hung_inference(edge: Box) -> None:
    drop_in(edge, "WatchdogSec=4s")
    configure(edge, base_config(stall_timeout_s=1.0))
    pid, restarts = main_pid(edge), int(edge.show("edgeagent.service", "NRestarts"))
    host_pid = edge.host_pid(pid)
    tids = [tid for tid, name, _ in thread_affinities(host_pid) if name == "ea-inference"]
    # The inference thread (the first) and llama.cpp's workers it started, named after it.
    # Only the workers are stopped: the inference thread then hangs inside llama_decode, where
    # it does not hold the GIL, as a real hang in llama.cpp would. Stopped itself, it might
    # hold the GIL and stop the event loop too (then only systemd's own timeout shows).
    workers = sorted(tids)[1:]
    assert workers
    since = time.time()
    tracer = None
    with Conn(str(edge.path(SOCK)), timeout=120) as c:
        c.send({"id": "hang", "prompt": "Write a long story about a press.", "max_tokens": 64})
        assert c.read()["event"] == "token"
        try:
            tracer = stop_threads(workers)
            wait_for(lambda: main_pid(edge) not in (0, pid), timeout=60, what="a new instance")
        finally:
            if tracer is not None:
                tracer.kill()
                tracer.wait()
    journal = edge.journal("edgeagent.service", since)
    assert "no longer feeding the watchdog" in journal, journal
    assert "Watchdog timeout" in journal, journal
    assert int(edge.show("edgeagent.service", "NRestarts")) == restarts + 1
    wait_active(edge)
    assert ask(edge, "after-hang")[-1]["event"] == "done"


@pytest.mark.parametrize("setting", ["CPUAffinity", "AllowedCPUs"])
def test_systemd_narrows_the_cores_edgeagent_pins_to(edge: Box, setting: str) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"{setting}= can narrow nothing on a one-core machine")
    controllers = edge.path("/sys/fs/cgroup/cgroup.controllers")
    if setting == "AllowedCPUs" and (
        not controllers.exists() or "cpuset" not in controllers.read_text().split()
    ):
        pytest.skip(
            "AllowedCPUs= needs cgroup v2's cpuset controller; this machine's kernel gives "
            "the box cgroup v1 (hybrid), where systemd ignores it"
        )
    core = cores[-1]
    drop_in(edge, f"{setting}={core}")
    edge.systemctl("restart", "edgeagent.service")
    wait_active(edge)
    assert ask(edge, "pinned")[-1]["event"] == "done"
    allowed = {tid: cores for tid, _, cores in thread_affinities(edge.host_pid(main_pid(edge)))}
    assert set(allowed.values()) == {(core,)}, allowed
    with Conn(str(edge.path(SOCK))) as c:
        placement = c.op("status")["cpu"]
    assert (placement["inference_cores"], placement["io_cores"]) == (str(core), str(core))


@pytest.fixture
def cloud(model_file: Path, tmp_path: Path) -> Iterator[tuple[Broker, int]]:
    broker = Broker(tmp_path).start()
    server, port = openai_stand_in(model_file, tmp_path / "model-server.log", STAND_IN)
    try:
        yield broker, port
    finally:
        server.stop()
        broker.stop()


def test_the_cloud_worker_unit_serves_an_escalation(edge: Box, cloud: tuple[Broker, int]) -> None:
    broker, port = cloud
    edge.path("/etc/edgeagent/worker.toml").write_text(
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'[worker]\nworker_id = "box-worker"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        f'model = "{STAND_IN}"\nrequest_timeout_s = 120\n'
    )
    edge.path("/etc/edgeagent/worker.toml").chmod(0o644)
    edge.run("bash", INSTALL, "--worker", timeout=900)  # now it starts the worker
    wait_active(edge, "edgeagent-cloud-worker.service")
    configure(
        edge,
        base_config() + f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
        "reconnect_min_s = 1\nreconnect_max_s = 2\n[escalation]\nenabled = true\ntimeout_s = 60\n",
    )  # fmt: skip

    def link_up() -> bool:
        with Conn(str(edge.path(SOCK))) as c:
            return bool(c.op("status")["escalation"]["link"]["up"])

    wait_for(link_up, what="the cloud link")
    events = ask(edge, "deep", "Name one metal.", max_tokens=8, escalate=True)
    done = events[-1]
    assert done["event"] == "done", events
    assert done["source"] == "cloud" and done["model"] == STAND_IN, done
    assert done["escalation"]["status"] == "answered", done
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]
    edge.systemctl("stop", "edgeagent-cloud-worker.service")
    assert edge.show("edgeagent-cloud-worker.service", "ExecMainStatus") == "0"


def test_the_guard_refuses_any_root_but_a_box_overlay(tmp_path: Path) -> None:
    """Booting systemd over the machine's own root is refused before anything starts."""
    with pytest.raises(container.BoxError, match="host's root"):
        container.refuse_unsafe_root(Path("/"), tmp_path)
    with pytest.raises(container.BoxError, match="host's root"):
        container.refuse_unsafe_root(tmp_path, Path("/"))
    with pytest.raises(container.BoxError, match="not a tree made for the tests"):
        container.refuse_unsafe_root(tmp_path, tmp_path)
    (tmp_path / container.MARKER).write_text("")
    with pytest.raises(container.BoxError, match="not an overlay"):
        container.refuse_unsafe_root(tmp_path, tmp_path)
