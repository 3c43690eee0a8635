"""A throwaway Debian box with systemd as PID 1, for the tests that need the real thing.

The box is `systemd-nspawn -b` over an overlay: the lower layer is a Debian tree made once by
mmdebstrap and cached outside the checkout (like the llama.cpp wheel); everything the box
writes goes to an upper layer under the test's temporary directory and is thrown away.

Never boot systemd over the machine's own root filesystem: its boot-time tmpfiles setup
empties the host's /tmp and it starts the host's services. `Box.boot` refuses any root that is
not its own overlay over a tree this module made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

SUITE = "bookworm"
# What the tree holds besides minbase: systemd as init, and what scripts/install.sh and
# `make` expect of a Debian box (the installer would otherwise apt-get them on each boot).
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-dev", "gcc", "g++",
    "make", "git", "ca-certificates", "netcat-openbsd",
)  # fmt: skip
MARKER = ".edgeagent-test-tree"  # written last: a tree without it is unfinished
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}


class BoxError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """Debian packages this module needs that are not installed (make system-deps adds them)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def inside_a_box() -> bool:
    """True inside a systemd-nspawn container, where another one cannot be booted here."""
    try:
        return Path("/run/host/container-manager").read_text().strip() == "systemd-nspawn"
    except OSError:
        return False


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeagent" / "containers"


def tree(log: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """The cached Debian tree with `packages` (made by mmdebstrap on first use: about 30 s and
    550 MB with the default ones)."""
    key = hashlib.sha256(f"{SUITE} {platform.machine()} {' '.join(packages)}".encode())
    path = cache_root() / f"{SUITE}-{key.hexdigest()[:12]}"
    if (path / MARKER).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others reuse it
        if (path / MARKER).is_file():
            return path
        tmp = path.with_name(path.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        with open(log, "ab") as out:
            res = subprocess.run(
                ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
                 str(tmp)],
                stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False,
            )  # fmt: skip
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BoxError(f"mmdebstrap failed ({res.returncode}); see {log}")
        (tmp / MARKER).write_text(f"{SUITE} {' '.join(packages)}\n")
        tmp.rename(path)
    return path


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of this process's mounts."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _source, options = right.split(" ", 2)
        out.append((left.split()[4], fstype, options))
    return out


def refuse_unsafe_root(root: Path, lower: Path) -> None:
    """Raise unless `root` is an overlay mount over the marked tree `lower`, not the host."""
    host = os.stat("/")
    for path in (root, lower):
        real = os.path.realpath(path)
        st = os.stat(real)
        if real == "/" or (st.st_dev, st.st_ino) == (host.st_dev, host.st_ino):
            raise BoxError(f"refusing to boot systemd over the host's root ({path})")
    if not (lower / MARKER).is_file():
        raise BoxError(f"refusing to boot {lower}: not a tree made for the tests")
    mine = [m for m in _mounts() if m[0] == os.path.realpath(root)]
    if not mine or mine[-1][1] != "overlay" or f"lowerdir={lower}" not in mine[-1][2]:
        raise BoxError(f"refusing to boot {root}: not an overlay over {lower}")


def _child_named(parent: int, comm: str) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if ppid == parent and name == comm:
                return int(stat.parent.name)
    return 0


class Box:
    """One booted container. Commands run inside with `run`; files are reached from the host
    at `path(...)` (through /proc/<its init>/root, so /run and /tmp are the box's own)."""

    def __init__(self, lower: Path, workdir: Path) -> None:
        self.lower, self.workdir = lower, workdir
        self.root = workdir / "root"
        self.log_path = workdir / "boot.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.leader = 0
        self._mounted = False

    def boot(self, timeout: float = 120) -> Box:
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        options = (
            f"lowerdir={self.lower},upperdir={self.workdir / 'upper'},"
            f"workdir={self.workdir / 'work'}"
        )
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                       check=True)  # fmt: skip
        self._mounted = True
        refuse_unsafe_root(self.root, self.lower)
        # The box trusts what this machine trusts (a proxy's CA, say), so pip works inside.
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(crt, self.root / "usr/local/share/ca-certificates" / crt.name)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "-b",
                 "--console=passive"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise BoxError(f"systemd-nspawn exited {self.proc.returncode}: {self.boot_log()}")
            if time.monotonic() > deadline:
                raise BoxError(f"no init in the box: {self.boot_log()}")
            self.leader = _child_named(self.proc.pid, "systemd")
            time.sleep(0.1)
        # systemctl says "offline" (or nothing) until the box's systemd has made
        # /run/systemd/system and its bus; on a slow or cold machine that is seconds after
        # the process appears, so both mean "not yet", not "failed".
        started, states = time.monotonic(), []
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(1.0, deadline - time.monotonic()))  # fmt: skip
            states.append(state.stdout.strip() or state.stderr.strip()[:80])
            if state.stdout.strip() not in ("", "offline") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state.stdout.strip() not in ("running", "degraded"):
            seen = self.run("ps", "-eo", "pid,stat,comm", check=False).stdout
            raise BoxError(
                f"the box did not boot in {time.monotonic() - started:.1f} s; systemctl said "
                f"{sorted(set(states))} ({len(states)} tries)\n{state.stderr}\n"
                f"processes in the box:\n{seen}\n{self.boot_log()}"
            )
        self.run("update-ca-certificates")
        return self

    def run(self, *cmd: str, check: bool = True, timeout: float = 300,
            input: Optional[str] = None, env: Optional[dict[str, str]] = None,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """`cmd` inside the box, as root, with a clean environment."""
        self._alive()
        environ = {"PATH": BOX_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        args = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "env", "-i",
                *(f"{k}={v}" for k, v in environ.items()), *cmd]  # fmt: skip
        res = subprocess.run(args, input=input, capture_output=True, text=True,
                             timeout=timeout, check=False)  # fmt: skip
        if check and res.returncode != 0:
            raise BoxError(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", "--no-pager", *args, check=check).stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit)

    def journal(self, unit: str, since: float = 0.0) -> str:
        args = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        if since:
            args.append(f"--since=@{since:.3f}")
        return self.run(*args, check=False).stdout

    def path(self, inside: str) -> Path:
        """A file of the box, seen from the host."""
        self._alive()
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def _alive(self) -> None:
        """Refuse to act unless the leader is still the box's init: were it gone and its pid
        reused, nsenter and /proc/<pid>/root would reach the host itself."""
        if not self.leader or self.proc is None or self.proc.poll() is not None:
            raise BoxError("the box is not running")
        if not Path(f"/proc/{self.leader}/root/{MARKER}").is_file():
            raise BoxError(f"process {self.leader} is not the box's init any more")

    def host_pid(self, pid: int) -> int:
        """The host's pid of the box's process `pid`."""
        ns = os.readlink(f"/proc/{self.leader}/ns/pid")
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                if os.readlink(status.parent / "ns" / "pid") != ns:
                    continue
                for line in status.read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                        return int(status.parent.name)
        raise BoxError(f"no process {pid} in the box")

    def boot_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the box's systemd to power off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # Killing the box's PID 1 ends every process in it; killing nspawn alone
                # would leave them running (with --keep-unit no scope collects them).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
                self.proc.wait(30)
        deadline = time.monotonic() + 30
        while self.leader and Path(f"/proc/{self.leader}").exists():
            if time.monotonic() > deadline:
                raise BoxError(f"the box's init {self.leader} did not end; left mounted")
            time.sleep(0.1)
        self.leader = 0
        if self._mounted:
            res = subprocess.run(["umount", str(self.root)], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.workdir / "upper", ignore_errors=True)
        shutil.rmtree(self.workdir / "work", ignore_errors=True)
