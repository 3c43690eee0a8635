"""A small blocking client for the Unix socket, used by `edgeagent ask|chat|status` and scripts."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

DEFAULT_SOCKETS = ("run/edgeagent.sock", "/run/edgeagent/edgeagent.sock")


def default_socket_path() -> str:
    """$EDGEAGENT_SOCKET, else ./run/edgeagent.sock if present (make run), else the service's."""
    env = os.environ.get("EDGEAGENT_SOCKET")
    if env:
        return env
    for candidate in DEFAULT_SOCKETS:
        if Path(candidate).exists():
            return candidate
    return DEFAULT_SOCKETS[-1]


class ClientError(Exception):
    pass


class Client:
    def __init__(self, path: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.path = path or default_socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ClientError(
                f"cannot connect to {self.path}: {exc.strerror or exc} (is the daemon running?)"
            ) from None
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_id(self) -> str:
        return f"{os.getpid()}-{next(self._ids)}"

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self._sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as exc:  # a daemon that closed the connection is EPIPE, not our stdout's
            raise ClientError(f"cannot send to {self.path}: {exc.strerror or exc}") from None

    def read_event(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ClientError("the daemon closed the connection")
        event: dict[str, Any] = json.loads(line)
        return event

    def events(self, rid: str) -> Iterator[dict[str, Any]]:
        """Events of request `rid`, up to and including its final `done` or `error`."""
        while True:
            event = self.read_event()
            if event.get("id") != rid:
                continue
            yield event
            if event.get("event") in ("done", "error"):
                return

    def ask(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request.setdefault("id", self.new_id())
        self.send(request)
        return self.events(request["id"])

    def op(self, name: str, **fields: Any) -> dict[str, Any]:
        self.send({"op": name, **fields})
        while True:
            event = self.read_event()
            if event.get("event") in (name, "error"):
                return event
