"""Talking to systemd: sd_notify messages and sockets passed by socket activation."""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import sdnotify

log = logging.getLogger("edgeagent.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify when run under systemd (NOTIFY_SOCKET set); silent otherwise.

    The socket is non-blocking: it is written from the event loop, and a receiver that stops
    reading (a busy PID 1, a full datagram queue) must not stall every request with it. A
    message with no room is dropped; a dropped WATCHDOG=1 is one more reason for systemd to
    check on us, never a reason to hang.
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sock: Optional[socket.socket] = None
        if self.enabled:
            self._sock = sdnotify.SystemdNotifier().socket
        if self._sock is not None:
            self._sock.setblocking(False)
        self.dropped = 0

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send("\n".join(lines).encode())
        except BlockingIOError:
            if not self.dropped:
                log.warning("systemd is not reading notifications; dropping %s", lines[0])
            self.dropped += 1
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", lines[0], exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def watchdog_interval() -> Optional[float]:
    """Half of systemd's WatchdogSec= (from WATCHDOG_USEC), or None when no watchdog is set."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def inherited_unix_socket() -> Optional[socket.socket]:
    """The listening Unix socket systemd passed us (LISTEN_FDS/LISTEN_PID), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            sock.setblocking(False)
            return sock
        sock.detach()
    return None
