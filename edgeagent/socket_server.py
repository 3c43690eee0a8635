"""The Unix socket front end for factory terminals: JSON Lines in, JSON Lines out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Hashable
from pathlib import Path
from typing import Optional

from edgeagent import protocol
from edgeagent.config import SocketConfig
from edgeagent.dispatcher import Dispatcher
from edgeagent.engine import Event

log = logging.getLogger("edgeagent.socket")

READ_CHUNK = 64 * 1024
# A client that stops reading while tokens stream in is cut off past this much unsent output.
MAX_UNSENT_BYTES = 8 << 20
HANGUP_POLL_S = 0.02


class SocketError(Exception):
    """The socket cannot be created (path in use, not writable...)."""


def peer_credentials(sock: socket.socket) -> str:
    """`pid=N uid=N gid=N` of the connecting process, from SO_PEERCRED."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return f"pid={pid} uid={uid} gid={gid}"
    except OSError:
        return "peer=unknown"


class ConnectionSink:
    """A ReplySink writing JSON lines to one connected terminal."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str, max_inflight: int,
                 priority: int = 0) -> None:  # fmt: skip
        self._writer = writer
        self._peer = peer
        self._closed = False
        self._max_inflight = max_inflight
        self._priority = priority

    @property
    def peer(self) -> str:
        return self._peer

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

    def send(self, event: Event) -> None:
        if self.closed:
            return
        self._writer.write(protocol.encode(event))
        if self._writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            log.warning("%s is not reading its replies; closing the connection", self._peer)
            self.close()

    def close(self) -> None:
        self._closed = True
        self._writer.close()


class SocketServer:
    def __init__(self, cfg: SocketConfig, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.path = Path(cfg.path)
        self._server: Optional[asyncio.AbstractServer] = None
        self._owns_path = False
        self._connections: set[ConnectionSink] = set()

    async def start(self, inherited: Optional[socket.socket] = None) -> None:
        """Listen on an inherited socket (systemd socket activation) or bind the path."""
        if inherited is not None:
            self._server = await asyncio.start_unix_server(self._serve, sock=inherited)
            log.info("listening on inherited socket %s", inherited.getsockname())
            return
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
        log.info("listening on %s (mode %04o)", self.path, self.cfg.mode)

    def _prepare_path(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # strerror would say only "File exists"
            raise SocketError(f"{self.path.parent} exists and is not a directory") from None
        except OSError as exc:
            raise SocketError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # stale socket from a previous run
            return
        finally:
            probe.close()
        raise SocketError(f"{self.path} is in use by another running daemon")

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._owns_path = False

    def close_connections(self) -> None:
        for sink in list(self._connections):
            sink.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else "peer=unknown"
        sink = ConnectionSink(writer, peer, self.cfg.max_inflight_per_conn, self.cfg.priority)
        self._connections.add(sink)
        log.info("terminal connected: %s", peer)
        limit = self.cfg.max_line_bytes
        buf = b""
        discarding = False  # inside an over-long line, waiting for its end
        try:
            while not sink.closed:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if discarding:
                        discarding = False
                    elif len(line) > limit:  # it came in whole, within one read
                        self._too_long(sink)
                    else:
                        self._line(line, sink)
                if len(buf) > limit:
                    if not discarding:
                        self._too_long(sink)
                    discarding = True
                    buf = b""
                await writer.drain()
            if buf.strip() and not discarding:
                self._line(buf, sink)  # a last request without its newline
            await self._finish_half_closed(sock, sink)
        except (ConnectionError, OSError) as exc:
            log.info("terminal %s: connection error: %s", peer, exc)
        finally:
            self._connections.discard(sink)
            self.dispatcher.sink_closed(sink)
            sink.close()
            log.info("terminal disconnected: %s", peer)

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
