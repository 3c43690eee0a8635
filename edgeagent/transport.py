"""What a front end is to edgeagent: read this module to add one.

A front end (the Unix socket, MQTT, HTTP) listens for its clients, turns what they send into
requests for the Dispatcher, and turns the Dispatcher's events back into its own wire format.
It touches nothing else: the engine, the escalation spool and the cloud link are behind the
Dispatcher, and the request/event vocabulary is protocol.py's.

Adding one:

1. Give every client a ReplySink (below). `identity` is the trust boundary: sessions, cloud
   results, quotas and cached prompt cells belong to it, so it must come from something the
   client cannot choose for itself (a socket peer's uid, an MQTT reply topic the broker's ACL
   lets only that client read, an HTTP API key), never from a field in the request.
2. Hand each request to the Dispatcher: `handle_payload(bytes, sink)` for one JSON request or
   op (socket lines, MQTT payloads), or `handle_decoded(obj, sink)` with a dict the front end
   built from its own format (HTTP's OpenAI bodies). Invalid input comes back as an `error`
   event on the sink, never as an exception.
3. Deliver the events in order: `token` and `restart` while the answer streams, then exactly
   one final event (`done` or `error`, see protocol.FINAL_EVENTS) carrying the request's id.
4. When a client goes away, call `Dispatcher.sink_closed(sink)`: what it asked for is cancelled
   and its slot freed at the next token.
5. Implement FrontEnd (below) so the daemon starts it, stops it taking new work while the
   requests in flight finish, then closes it; register `status` as a section of the
   Dispatcher's status (`dispatcher.status_sections[name]`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from collections.abc import Hashable
from typing import Any, Optional, Protocol

from edgeagent.protocol import Event


class ReplySink(Protocol):
    """Where one client's events go; the Dispatcher calls it on the event loop only."""

    @property
    def front_end(self) -> str:
        """Which front end the client came through ("socket", "mqtt", "http"), for metrics."""

    @property
    def peer(self) -> str:
        """Who is asking, for logs."""

    @property
    def identity(self) -> str:
        """Who the client is, for what outlives a request: sessions, results, quotas, the
        prompt cache. Socket: the peer's uid (SO_PEERCRED); MQTT: the reply topic; HTTP: the
        API key's name."""

    @property
    def scope(self) -> Hashable:
        """Request ids are unique within a scope: a socket connection, an MQTT reply topic, an
        HTTP key (whose request ids the front end makes)."""

    @property
    def max_inflight(self) -> int:
        """How many requests this scope may have in flight at once."""

    @property
    def priority(self) -> int:
        """Priority of this front end's requests that set none (terminals before bulk jobs)."""

    @property
    def closed(self) -> bool:
        """The client is gone: its events are dropped."""

    @property
    def reply_address(self) -> Optional[tuple[str, Optional[bytes]]]:
        """(MQTT reply topic, correlation data) for follow-ups that outlive the connection;
        None where the client asks for them itself (the `result` op)."""

    def send(self, event: Event) -> None:
        """Queue an event for the client; called on the event loop, must not block."""


class FrontEnd(Protocol):
    """A listener the daemon runs beside the others: `start` (once the model is loaded and
    the Dispatcher exists; HTTP starts earlier, to answer /health while the model loads, and
    is given the Dispatcher later); at a stop `stop_accepting` (no new clients or requests;
    those in flight go on), the Dispatcher's drain, then `close`."""

    name: str

    async def start(self) -> None: ...

    async def stop_accepting(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


def inherited_listener_args(sock: socket.socket) -> dict[str, Any]:
    """asyncio server arguments for a listening socket systemd passed: keep the backlog
    systemd set (asyncio listens again, by default with 100), which queues clients while the
    daemon is down; and leave a Unix socket's path to systemd (from Python 3.13 asyncio
    unlinks it when the server closes, unless told not to)."""
    args: dict[str, Any] = {"sock": sock, "backlog": socket.SOMAXCONN}
    if sock.family == socket.AF_UNIX and sys.version_info >= (3, 13):
        args["cleanup_socket"] = False
    return args


def remove_stale_socket(path: str) -> None:
    """Make way for a Unix socket at `path`: a socket file an earlier run left is removed.
    Raises OSError, its strerror the whole reason, for a socket a server still answers on and
    for a file there that is not a socket (never removed: a typo must not delete a spool)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(
                errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
            )
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nothing listens on it
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another running server")
