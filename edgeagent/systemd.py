"""Talking to systemd: sd_notify messages and sockets passed by socket activation."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
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


# FileDescriptorName= of the socket units, or the name systemd gives a socket when its unit
# sets none (the unit's own: edgeagent.socket sets none, so that units installed before
# edgeagent-http.socket existed need no restart of the terminal socket on an upgrade).
TERMINAL_NAMES = ("terminal", "edgeagent.socket")
HTTP_NAMES = ("http", "edgeagent-http.socket")


@dataclass
class Inherited:
    """The listening sockets systemd passed, sorted by front end."""

    terminal: Optional[socket.socket] = None
    http: list[socket.socket] = field(default_factory=list)
    # Passed under a name no front end answers to: left open (systemd owns them), logged.
    unknown: list[str] = field(default_factory=list)


def inherited_sockets() -> Inherited:
    """The sockets systemd passed us (LISTEN_FDS/LISTEN_PID), by their LISTEN_FDNAMES.

    A socket named "terminal" (or edgeagent.socket, the name systemd gives it when the unit
    sets none) is the terminal socket; "http" (or edgeagent-http.socket) the HTTP front end's,
    as many as the unit lists. Without names (an old systemd, systemd-socket-activate without
    --fdname), the first Unix stream socket is the terminal socket, as before names existed.
    """
    found = Inherited()
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return found
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return found
    given = os.environ.get("LISTEN_FDNAMES")
    names = [name or "unknown" for name in given.split(":")] if given else []
    if len(names) != count:
        names = ["unknown"] * count  # what sd_listen_fds_with_names() reports
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    for fd, name in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count), names):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # ListenFIFO=, ListenSpecial=, ...: not a socket at all
            found.unknown.append(f"fd {fd} ({name}, not a socket)")
            continue
        listening = sock.type == socket.SOCK_STREAM and bool(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
        unix = sock.family == socket.AF_UNIX
        web = sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
        if listening and name in TERMINAL_NAMES and unix and found.terminal is None:
            found.terminal = sock
        elif listening and name in HTTP_NAMES and web:
            found.http.append(sock)
        elif listening and name == "unknown" and unix and found.terminal is None:
            found.terminal = sock
        else:
            sock.detach()
            found.unknown.append(f"fd {fd} ({name})")
            continue
        sock.setblocking(False)
        os.set_inheritable(fd, False)  # as sd_listen_fds() leaves them: not for our children
    if found.unknown:
        log.warning(
            "systemd passed sockets no front end uses: %s (edgeagent takes "
            "FileDescriptorName=terminal, a listening Unix stream socket, and =http, listening "
            "TCP or Unix stream sockets)",
            ", ".join(found.unknown),
        )
    return found
