"""The Unix socket front end for factory terminals: JSON Lines in, JSON Lines out."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import select
import socket
import struct
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Optional, TypeVar

from edgeagent import protocol
from edgeagent.config import SocketConfig
from edgeagent.dispatcher import Dispatcher
from edgeagent.protocol import Event
from edgeagent.transport import inherited_listener_args, remove_stale_socket

log = logging.getLogger("edgeagent.socket")

READ_CHUNK = 64 * 1024
HANGUP_POLL_S = 0.02

T = TypeVar("T")


# How long a closed connection's last replies may take to reach a client that reads slowly.
LINGER_S = 10.0


class SocketError(Exception):
    """The socket cannot be created (path in use, not writable...)."""


class _IdleTimeout(Exception):
    """A connection waited idle_timeout_s on its client with nothing of its in flight."""


def peer_credentials(sock: socket.socket) -> tuple[str, str]:
    """(`pid=N uid=N gid=N` for logs, `uid:N` as the client's identity) of the connecting
    process, from SO_PEERCRED. A peer the kernel cannot name gets an identity of its own."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return f"pid={pid} uid={uid} gid={gid}", f"uid:{uid}"
    except OSError:
        return "peer=unknown", f"conn:{os.urandom(8).hex()}"


class ConnectionSink:
    """A ReplySink writing JSON lines to one connected terminal."""

    front_end = "socket"

    def __init__(self, writer: asyncio.StreamWriter, peer: str, identity: str, max_inflight: int,
                 max_unsent: int, priority: int = 0) -> None:  # fmt: skip
        self._writer = writer
        self._peer = peer
        self._identity = identity
        self._closed = False
        self._max_inflight = max_inflight
        self._max_unsent = max_unsent
        self._priority = priority
        self.was_cut = False  # dropped for not reading its replies

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def scope(self) -> Hashable:
        return id(self)

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def closed(self) -> bool:
        return self._closed or self._writer.is_closing()

    @property
    def reply_address(self) -> Optional[tuple[str, Optional[bytes]]]:
        return None  # a terminal that reconnects asks with {"op": "result"}

    @property
    def unsent_bytes(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    def send(self, event: Event) -> None:
        if self.closed:
            return
        self._writer.write(protocol.encode(event))
        # The server stops reading a client's lines while its replies wait, so only replies it
        # did not ask for just now (tokens of requests in flight) can take it this far.
        if self.unsent_bytes > self._max_unsent:
            self.cut_off(f"is not reading its replies ({self._max_unsent} bytes unsent)")

    def close(self) -> None:
        """Close once the replies still unsent are written."""
        self._closed = True
        self._writer.close()

    def abort(self) -> None:
        """Close now, dropping the replies still unsent."""
        self._closed = True
        self._writer.transport.abort()

    def cut_off(self, why: str) -> None:
        """Drop a client that does not read its replies: a graceful close would keep its
        descriptor and buffer for as long as it keeps not reading."""
        log.warning("%s %s; closing the connection", self._peer, why)
        self.was_cut = True
        self.abort()


class SocketServer:
    """The Unix socket front end: JSON lines from factory terminals (docs/protocol.md)."""

    name = "socket"

    def __init__(self, cfg: SocketConfig, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.path = Path(cfg.path)
        self._server: Optional[asyncio.AbstractServer] = None
        self._owns_path = False
        self._connections: set[ConnectionSink] = set()
        self._lingering: set[asyncio.Task[None]] = set()
        self._refused = 0
        self._refusing = False  # refused one since a connection last closed: log no more
        self._idle_closed = 0
        self._slow_reader_cut = 0

    async def start(self, inherited: Optional[socket.socket] = None) -> None:
        """Listen on an inherited socket (systemd socket activation) or bind the path."""
        if inherited is not None:
            self._server = await asyncio.start_unix_server(
                self._serve, **inherited_listener_args(inherited)
            )
            log.info("listening on inherited socket %s", inherited.getsockname())
            return
        gid = self._group_id()
        self._prepare_path()
        old_umask = os.umask(0o777 & ~self.cfg.mode)  # no window with looser permissions
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as exc:
            raise SocketError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self.cfg.mode)
        self._owns_path = True
        if gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except OSError as exc:
                raise SocketError(
                    f"socket.group: cannot give {self.path} group {self.cfg.group}: {exc.strerror}"
                ) from None
        log.info("listening on %s (mode %04o%s)", self.path, self.cfg.mode,
                 f", group {self.cfg.group}" if gid is not None else "")  # fmt: skip

    def _group_id(self) -> Optional[int]:
        """The gid of `[socket] group`, None when unset; SocketError naming the key if unknown."""
        if not self.cfg.group:
            return None
        try:
            return grp.getgrnam(self.cfg.group).gr_gid
        except KeyError:
            raise SocketError(f"socket.group: no group named {self.cfg.group!r}") from None

    def _prepare_path(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # strerror would say only "File exists"
            raise SocketError(f"{self.path.parent} exists and is not a directory") from None
        except OSError as exc:
            raise SocketError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        try:
            remove_stale_socket(str(self.path))
        except OSError as exc:
            raise SocketError(exc.strerror or str(exc)) from None

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._owns_path = False

    async def close(self) -> None:
        for sink in list(self._connections):
            sink.close()

    def status(self) -> dict[str, Any]:
        """Connections and what the limits on them did, for the `status` op."""
        return {
            "connections": len(self._connections),
            "max_connections": self.cfg.max_connections,
            "refused_connections": self._refused,
            "idle_closed": self._idle_closed,
            "slow_reader_cut": self._slow_reader_cut,
            "unsent_bytes": sum(sink.unsent_bytes for sink in self._connections),
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer, identity = (
            peer_credentials(sock) if sock is not None else ("peer=unknown", f"conn:{id(writer)}")
        )
        if len(self._connections) >= self.cfg.max_connections:
            self._refuse(writer, peer)
            return
        sink = ConnectionSink(
            writer, peer, identity, self.cfg.max_inflight_per_conn, self.cfg.max_unsent_bytes,
            self.cfg.priority,
        )  # fmt: skip
        self._connections.add(sink)
        log.info("terminal connected: %s", peer)
        try:
            await self._read_lines(reader, writer, sink)
            await self._finish_half_closed(sock, sink)
        except _IdleTimeout:
            self._idle_closed += 1
            log.info("terminal %s sent nothing for %g s and has nothing in flight; closing the "
                     "connection", peer, self.cfg.idle_timeout_s)  # fmt: skip
            sink.abort()
        except (ConnectionError, OSError) as exc:
            log.info("terminal %s: connection error: %s", peer, exc)
        finally:
            self._refusing = False
            if sink.was_cut:
                self._slow_reader_cut += 1
            self.dispatcher.sink_closed(sink)
            sink.close()
            if sink.unsent_bytes:
                # Its last replies are still on their way: it stays counted until they are
                # out, or is dropped after LINGER_S (a client that shut down its sending side
                # and never reads would otherwise hold the descriptor, uncounted, for good).
                task = asyncio.get_running_loop().create_task(self._linger(writer, sink))
                self._lingering.add(task)
                task.add_done_callback(self._lingering.discard)
            else:
                self._connections.discard(sink)
            log.info("terminal disconnected: %s", peer)

    async def _linger(self, writer: asyncio.StreamWriter, sink: ConnectionSink) -> None:
        try:
            await asyncio.wait_for(writer.wait_closed(), LINGER_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            sink.abort()
        finally:
            self._connections.discard(sink)

    def _refuse(self, writer: asyncio.StreamWriter, peer: str) -> None:
        """Answer a connection over max_connections with one `busy` line, and close it.

        Not left waiting in the listen backlog instead: there a terminal has connected as far as
        it can tell, sends its request and hears nothing until another terminal hangs up (an idle
        one may take idle_timeout_s). `busy` at once, as for a full queue, lets it tell its
        operator and retry.
        """
        self._refused += 1
        limit = self.cfg.max_connections
        # A terminal retrying in a loop must not flood the journal: the count is in `status`.
        log.log(logging.DEBUG if self._refusing else logging.WARNING,
                "refusing terminal %s: %d connected, the most allowed", peer, limit)  # fmt: skip
        self._refusing = True
        message = f"{limit} terminals are connected, the most this daemon serves; try again later"
        writer.write(protocol.encode(protocol.error_event(None, protocol.BUSY, message)))
        writer.close()

    async def _read_lines(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: ConnectionSink
    ) -> None:
        """Hand every line the client sends to the dispatcher, until EOF or the sink closes.

        Only new bytes are searched for a newline, so a long line arriving in small reads costs
        linear time. Before each next line, the replies so far must have drained below the
        transport's high-water mark: a client that sends and does not read is stopped at the
        kernel's socket buffer instead of making the daemon buffer its answers.
        """
        limit = self.cfg.max_line_bytes
        transport = writer.transport
        # Well below the cut-off, so that replies already on their way (tokens of requests in
        # flight) still fit under it while the client catches up.
        _, high = transport.get_write_buffer_limits()
        mark = min(high, self.cfg.max_unsent_bytes // 2)
        transport.set_write_buffer_limits(high=mark)
        pending: list[bytes] = []  # the start of a line whose newline has not come yet
        pending_len = 0
        discarding = False  # inside an over-long line, waiting for its end
        while not sink.closed:
            chunk = await self._unless_idle(sink, lambda: reader.read(READ_CHUNK))
            if not chunk:
                break
            start = 0
            while not sink.closed:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    break
                if discarding:
                    discarding = False
                elif pending_len + nl - start > limit:  # its end came in the read that overran
                    self._too_long(sink)
                else:
                    self._line(b"".join([*pending, chunk[start:nl]]), sink)
                pending, pending_len, start = [], 0, nl + 1
                if not sink.closed and sink.unsent_bytes > mark:
                    try:
                        await self._unless_idle(sink, writer.drain)
                    except _IdleTimeout:
                        timeout = self.cfg.idle_timeout_s
                        sink.cut_off(f"has not read its replies for {timeout:g} s")
                        return
            if not discarding and start < len(chunk):
                pending.append(chunk[start:])
                pending_len += len(chunk) - start
            if pending_len > limit:
                if not discarding:
                    self._too_long(sink)
                discarding = True
                pending, pending_len = [], 0
        if pending and not sink.closed:
            self._line(b"".join(pending), sink)  # a last request without its newline

    async def _unless_idle(self, sink: ConnectionSink, step: Callable[[], Awaitable[T]]) -> T:
        """`await step()`, but raise _IdleTimeout once it has waited idle_timeout_s while the
        connection had nothing in flight. A request in flight restarts the wait: a terminal may
        say nothing for as long as its answer takes."""
        while True:
            timeout = self.cfg.idle_timeout_s
            if timeout <= 0:
                return await step()
            try:
                return await asyncio.wait_for(step(), timeout)
            except asyncio.TimeoutError:
                if not self.dispatcher.inflight_for(sink):
                    raise _IdleTimeout from None

    async def _finish_half_closed(
        self, sock: Optional[socket.socket], sink: ConnectionSink
    ) -> None:
        """After EOF, keep answering a client that only shut down its sending side.

        `echo '{...}' | nc -U` style clients half-close and keep reading; a client that went
        away entirely shows POLLHUP, and then its requests are cancelled at once.
        """
        if sock is None or sink.closed or sock.fileno() < 0:
            return
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        while not sink.closed and self.dispatcher.inflight_for(sink):
            if poller.poll(0):
                log.info("%s hung up with requests in flight; cancelling them", sink.peer)
                return
            await asyncio.sleep(HANGUP_POLL_S)

    def _too_long(self, sink: ConnectionSink) -> None:
        limit = self.cfg.max_line_bytes
        message = f"line longer than {limit} bytes; skipped"
        sink.send(protocol.error_event(None, protocol.BAD_REQUEST, message))
        self.dispatcher.stats.errors[protocol.BAD_REQUEST] += 1

    def _line(self, line: bytes, sink: ConnectionSink) -> None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            obj = protocol.decode(line)
        except protocol.ProtocolError:
            self.dispatcher.handle_payload(line, sink)  # the dispatcher answers the error
            return
        if isinstance(obj, dict) and "op" not in obj:
            # An audit trail of who asked what: the SO_PEERCRED identity and the request id
            # (repr: a client's id cannot forge log lines), never the request's text.
            log.info("request %r from %s", protocol.request_id_of(obj), sink.peer)
        self.dispatcher.handle_decoded(obj, sink)
