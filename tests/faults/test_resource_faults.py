"""Resource faults at start and at run time: a missing, truncated or corrupted model, a socket
path that cannot be used, an invalid config, a spool that cannot be opened, a systemd that
stops reading notifications. Each start-up fault ends in a clear message and a non-zero exit
code that systemd does not mask with a restart loop."""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent import daemon as edgeagent_daemon
from tests.conftest import ROOT, Daemon, config_text, connect
from tests.faults.conftest import small_filesystem
from tests.reliability import record

UNIT = ROOT / "systemd" / "edgeagent.service"


def run_daemon(tmp_path: Path, config: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cfg = tmp_path / "edgeagent.toml"
    cfg.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def socket_config(path: Path, extra: str = "") -> str:
    return config_text().replace("@SOCKET@", str(path)) + extra


def restart_prevented() -> set[int]:
    """The exit codes on which the unit's Restart=on-failure gives up at once."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return {int(code) for code in unit["Service"]["RestartPreventExitStatus"].split()}


def corrupted_copy(model_file: Path, directory: Path) -> Path:
    """The real model with one byte flipped in the middle: right size, wrong checksum."""
    directory.mkdir()
    copy = directory / model_file.name
    shutil.copyfile(model_file, copy)
    with open(copy, "r+b") as fh:
        fh.seek(copy.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return copy


def truncated_copy(model_file: Path, directory: Path) -> Path:
    """The real model cut off after 64 MB, as an interrupted copy leaves it."""
    directory.mkdir()
    copy = directory / model_file.name
    with open(model_file, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read(64 << 20))
    return copy


CASES = ["model missing", "model truncated", "model corrupted", "socket path read-only",
         "socket path is a file", "config invalid", "spool read-only"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_start_up_fault_exits_non_zero_with_a_clear_message(
    case: str, tmp_path: Path, model_file: Path
) -> None:
    sock = tmp_path / "edgeagent.sock"
    cfg_path = tmp_path / "edgeagent.toml"
    env: dict[str, str] = {}
    ro = tmp_path / "ro"
    if case == "model missing":
        env["EDGEAGENT_MODEL_DIR"] = str(tmp_path / "empty")
        config, code = socket_config(sock), edgeagent_daemon.EXIT_MODEL
        expect = [f"model file {tmp_path}/empty/{model_file.name} does not exist; run "
                  "`edgeagent model fetch`"]  # fmt: skip
    elif case == "model truncated":
        env["EDGEAGENT_MODEL_DIR"] = str(truncated_copy(model_file, tmp_path / "cache").parent)
        config, code = socket_config(sock), edgeagent_daemon.EXIT_MODEL
        expect = ["has 67108864 bytes, expected 491400064: truncated or wrong file; refusing to "
                  "load it"]  # fmt: skip
    elif case == "model corrupted":
        env["EDGEAGENT_MODEL_DIR"] = str(corrupted_copy(model_file, tmp_path / "cache").parent)
        config, code = socket_config(sock), edgeagent_daemon.EXIT_MODEL
        expect = ["expected 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32: "
                  "corrupted or wrong file; refusing to load it"]  # fmt: skip
    elif case == "socket path read-only":
        sock = ro / "edgeagent.sock"
        config, code = socket_config(sock), edgeagent_daemon.EXIT_LISTEN
        expect = [f"cannot listen on {sock}: Read-only file system"]
    elif case == "socket path is a file":
        (tmp_path / "not-a-dir").write_text("")
        sock = tmp_path / "not-a-dir" / "edgeagent.sock"
        config, code = socket_config(sock), edgeagent_daemon.EXIT_LISTEN
        expect = [f"{sock.parent} exists and is not a directory"]
    elif case == "config invalid":
        config = socket_config(sock, '[mqtt]\nport = 70000\nqos = "1"\n[escalation]\n'
                               'enabled = true\nspool_max = 0\n')  # fmt: skip
        code = edgeagent_daemon.EXIT_CONFIG
        expect = [f"{cfg_path}: mqtt.port: 70000 is above the maximum 65535",
                  f"{cfg_path}: mqtt.qos: expected an integer, got str '1'",
                  f"{cfg_path}: escalation.spool_max: 0 is below the minimum 1",
                  f"{cfg_path}: escalation.enabled: needs the cloud broker"]  # fmt: skip
    else:
        spool = ro / "escalations.sqlite"
        config = socket_config(sock, f'[escalation]\nenabled = true\nspool_path = "{spool}"\n'
                               '[cloud]\nenabled = true\nport = 9\n')  # fmt: skip
        code = edgeagent_daemon.EXIT_SPOOL
        expect = [f"cannot open the escalation spool {spool}: Read-only file system"]
    with read_only_at(ro, case):
        res = run_daemon(tmp_path, config, env)
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    for fragment in expect:
        assert fragment in out, out
    assert "Traceback" not in out
    assert not sock.exists()  # nothing half-started is left behind
    # systemd sees the failure: model and config faults stop the unit at once (no restart
    # loop masking them); the others are retried RestartSec apart until StartLimitBurst.
    if code in (edgeagent_daemon.EXIT_CONFIG, edgeagent_daemon.EXIT_MODEL):
        assert code in restart_prevented()
    record(
        f"resource: {case} at start",
        category="resource",
        load="daemon start",
        faults=case,
        inputs="config and model file as described",
        accepted=0,
        answered=0,
        lost=0,
        duplicated=0,
        figures={
            "exit_code": res.returncode,
            "message": next(line for line in out.splitlines() if expect[0][:30] in line)
            .split(" ERROR edgeagent: ")[-1]
            .replace(str(tmp_path), "<tmp>"),
        },
    )


def read_only_at(path: Path, case: str) -> contextlib.AbstractContextManager[object]:
    """A read-only filesystem at `path` for the cases that need one (root may write anywhere
    else, whatever the modes say); nothing for the others."""
    if "read-only" in case:
        return small_filesystem(path, 64, read_only=True)
    return contextlib.nullcontext()


def test_systemd_not_reading_notifications_stalls_nothing(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notification socket nobody reads fills up after a few datagrams; the daemon drops
    what has no room and keeps serving (it used to block its event loop in sendto)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms: the queue fills at once
    d = Daemon(tmp_path, config_text()).start()
    try:
        time.sleep(1.0)
        ids = [f"n{i}" for i in range(3)]
        with connect(d.socket_path, timeout=60) as c:
            finals = []
            for rid in ids:
                c.send({"id": rid, "prompt": "Say OK.", "max_tokens": 3})
                finals.append(c.until_final(rid)[-1])
        assert [e["event"] for e in finals] == ["done"] * 3, finals
        assert "systemd is not reading notifications; dropping WATCHDOG=1" in d.log()
        assert d.stop(signal.SIGTERM) == 0
    finally:
        d.stop()
        notify.close()
    record(
        "resource: systemd not reading notifications",
        category="resource",
        load="3 requests",
        faults="NOTIFY_SOCKET never read (datagram queue full), watchdog pings every 50 ms",
        inputs="valid requests",
        accepted=3,
        answered=3,
        lost=0,
        duplicated=0,
    )
