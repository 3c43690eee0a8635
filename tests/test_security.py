"""Security of the terminal socket: who may connect is decided by the socket file's owner, group
and mode, and every request is logged with the SO_PEERCRED identity of the process that sent it.

The tests run as root; the clients that must be refused run as uid/gid 65534 (nobody) in a
child process, so the kernel, not the test, decides who gets in.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, config_text, connect
from tests.reliability import record

NOBODY = 65534
# A group no account on the box has: the socket's group, which the allowed client joins.
TERMINALS_GID = 64123
# Not the default 0660, so the check sees the configured value; connecting to a Unix socket
# needs write permission only, so the group may connect and others may not.
SOCKET_MODE = 0o620

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as nobody")

CLIENT = r"""
import json, os, socket, sys
path, request = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(120)
try:
    s.connect(path)
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "pid": os.getpid()}))
    sys.exit(0)
s.sendall(request.encode() + b"\n")
events, buf = [], b""
while not events or events[-1].get("event") not in ("done", "error", "status"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    *lines, buf = buf.split(b"\n")
    events += [json.loads(line) for line in lines if line]
print(json.dumps({"events": events, "pid": os.getpid()}))
"""


@functools.cache
def unprivileged_python() -> str:
    """A Python that uid 65534 may run (the venv's may live under root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([candidate, "-I", "-c", "pass"], user=NOBODY, group=NOBODY,
                                   extra_groups=[], cwd="/", capture_output=True,
                                   check=False)  # fmt: skip
        except OSError:  # missing, or not executable by uid 65534
            continue
        if probe.returncode == 0:
            return candidate
    pytest.fail("no Python interpreter that uid 65534 may run")


def client_as(socket_path: str, request: dict[str, Any], groups: list[int]) -> dict[str, Any]:
    """Connect as uid/gid 65534 with supplementary `groups` and send one request."""
    res = subprocess.run(
        [unprivileged_python(), "-I", "-c", CLIENT, socket_path, json.dumps(request)],
        user=NOBODY, group=NOBODY, extra_groups=groups, cwd="/", capture_output=True,
        text=True, timeout=180, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@pytest.fixture(scope="module")
def guarded(model_file: Path) -> Iterator[Daemon]:
    """A daemon whose socket lives in a directory anyone may traverse, so only the socket's
    own owner, group and mode stand between a client and the daemon. The directory is setgid
    to the terminals' group, which gives the socket that group (as RuntimeDirectory= and
    SocketGroup= do under systemd)."""
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-sec-"))
    os.chown(workdir, 0, TERMINALS_GID)
    os.chmod(workdir, 0o2755)
    text = config_text(node_id="sec-socket") + f'mode = "{SOCKET_MODE:04o}"\n'
    d = Daemon(workdir, text).start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_socket_has_the_configured_mode_owner_and_group(guarded: Daemon) -> None:
    st = os.lstat(guarded.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == SOCKET_MODE, oct(st.st_mode)
    assert st.st_uid == os.geteuid()  # the daemon's user
    assert st.st_gid == TERMINALS_GID
    assert f"(mode {SOCKET_MODE:04o})" in guarded.log()


def test_client_outside_the_group_is_refused_and_a_member_is_served(guarded: Daemon) -> None:
    rid = f"member-{uuid.uuid4().hex[:6]}"
    request = {"id": rid, "prompt": "Name a colour.", "max_tokens": 4}
    outsider = client_as(guarded.socket_path, request, groups=[])
    assert outsider.get("errno") == errno.EACCES, outsider
    member = client_as(guarded.socket_path, request, groups=[TERMINALS_GID])
    events = member.get("events")
    assert events, member
    assert events[-1]["event"] == "done" and events[-1]["id"] == rid, events
    assert events[-1]["text"].strip()
    # The refused client never reached the daemon: no connection of uid 65534 was logged
    # before the member's.
    connected = [line for line in guarded.log().splitlines() if "terminal connected" in line]
    assert sum(f"uid={NOBODY} " in line for line in connected) == 1, connected
    record(
        "socket: client outside the socket's group",
        category="security",
        load="2 clients as uid 65534: one without the socket's group, one with it",
        faults="connection attempt by a process outside the socket's owner and group",
        inputs=f"socket mode {SOCKET_MODE:04o}, group {TERMINALS_GID}",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={
            "outsider_errno": errno.errorcode[outsider["errno"]],
            "member_events": len(events),
            "socket_mode": f"{SOCKET_MODE:04o}",
        },
    )


def test_every_request_is_logged_with_its_peer_credentials(guarded: Daemon) -> None:
    rid = f"cred-{uuid.uuid4().hex[:6]}"
    member = client_as(guarded.socket_path, {"id": rid, "prompt": "Say OK.", "max_tokens": 2},
                       groups=[TERMINALS_GID])  # fmt: skip
    assert member["events"][-1]["event"] == "done", member
    root_rid = f"root-{uuid.uuid4().hex[:6]}"
    with connect(guarded.socket_path) as c:
        c.send({"id": root_rid, "prompt": "Say OK.", "max_tokens": 2})
        assert c.until_final(root_rid)[-1]["event"] == "done"
    # A client cannot forge a log line through its id.
    forged = "x\nINFO edgeagent.socket: request 'y' from pid=1 uid=0 gid=0"
    with connect(guarded.socket_path) as c:
        c.send({"id": forged, "prompt": "Say OK.", "max_tokens": 2})
        assert c.until_final(forged)[-1]["event"] == "done"
    lines = guarded.log().splitlines()
    member_lines = [line for line in lines if f"request '{rid}'" in line]
    assert len(member_lines) == 1, member_lines
    assert f"from pid={member['pid']} uid={NOBODY} gid={NOBODY}" in member_lines[0]
    root_lines = [line for line in lines if f"request '{root_rid}'" in line]
    assert len(root_lines) == 1 and f"pid={os.getpid()} uid=0 gid=0" in root_lines[0]
    forged_lines = [line for line in lines if 'request "x\\nINFO' in line]
    assert len(forged_lines) == 1, forged_lines  # logged on one line, the newline escaped
    assert not [line for line in lines if line.startswith("INFO edgeagent.socket: request 'y'")]
    record(
        "socket: SO_PEERCRED identity per request",
        category="security",
        load="3 requests from 2 users (uid 65534 in the socket's group, root)",
        faults="a request id carrying a newline and a fake log line",
        inputs="ids checked against the daemon log",
        accepted=3,
        answered=3,
        lost=0,
        duplicated=0,
        figures={"requests_logged_with_identity": len(member_lines + root_lines + forged_lines)},
    )
