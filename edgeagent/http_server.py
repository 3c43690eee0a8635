"""The HTTP front end: OpenAI's API, /health and /metrics, served by aiohttp from the daemon's
own event loop (docs/http.md).

Every API request is one ReplySink whose events this module turns into an OpenAI response or
stream (http_api.py does the shapes). Its client identity is the API key's name; without keys
(only allowed on loopback addresses) every client is the one local identity `http:loopback`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Hashable, Sequence
from importlib import resources
from typing import Any, Callable, Optional

from aiohttp import ClientPayloadError, web

from edgeagent import config, http_api, protocol
from edgeagent.config import HttpConfig
from edgeagent.dispatcher import Dispatcher
from edgeagent.http_api import ApiError, Call
from edgeagent.metrics import CONTENT_TYPE, Metrics
from edgeagent.protocol import FINAL_EVENTS, Event
from edgeagent.transport import inherited_listener_args, remove_stale_socket

log = logging.getLogger("edgeagent.http")

LOOPBACK_IDENTITY = "http:loopback"
CHAT_PAGE = "web/index.html"
# How long a stopping daemon's HTTP connections get to finish writing their last events.
SHUTDOWN_S = 2.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Idle connections, and ones whose request never ends, are closed after this.
KEEPALIVE_S = 30.0
# A TLS client that has not finished its handshake by then is dropped.
HANDSHAKE_S = 10.0
# The SDKs retry 5xx; these mean that the same request would fail the same way (or run again
# for minutes on a busy box), so they say not to.
NO_RETRY = {"x-should-retry": "false"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpSink:
    """A ReplySink for one API request: events wait in a queue the request's handler reads.

    The queue holds at most one answer's events (the engine sends no more tokens than
    max_tokens), and nothing once the client is gone.
    """

    front_end = "http"
    reply_address = None  # a cloud answer that comes later is fetched from /v1/edgeagent/results

    def __init__(self, identity: str, peer: str, max_inflight: int, priority: int) -> None:
        self.identity, self.peer = identity, peer
        self.max_inflight, self.priority = max_inflight, priority
        # Limits and fairness are per key; the front end makes the request ids unique.
        self.scope: Hashable = ("http", identity)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.gone = False  # the client went away: nothing more is queued
        self.finished = False

    @property
    def closed(self) -> bool:
        return self.gone

    def send(self, event: Event) -> None:
        if self.gone:
            return
        if event.get("event") in FINAL_EVENTS:
            self.finished = True
        self.events.put_nowait(event)


def _json(data: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error(exc: ApiError) -> web.Response:
    return _json(exc.body(), exc.status, exc.headers)


class HttpFrontEnd:
    """Listens on the configured addresses from before the model is loaded (so /health can
    say "loading"); answers API calls once `attach` has given it the dispatcher."""

    name = "http"

    def __init__(self, cfg: HttpConfig, metrics: Metrics, model_name: str,
                 inherited: Sequence[socket.socket] = ()) -> None:  # fmt: skip
        """`inherited`: listeners systemd passed (edgeagent-http.socket); when there are any,
        they are served instead of binding `http.listen`."""
        self.cfg = cfg
        self.inherited = list(inherited)
        self.metrics = metrics
        self.model_name = model_name
        # Both were checked when the config was loaded; read again here, where they are used.
        try:
            self.keys = config.read_api_keys(cfg)
        except OSError as exc:
            path = config.api_keys_path(cfg)[0]
            raise OSError(exc.errno, f"http.api_keys_file: {path}: {exc.strerror}") from None
        try:
            self.tls = config.server_tls(cfg)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OSError(
                errno.EINVAL, f"http.tls_key_file: {cfg.tls_key_file}: {reason}"
            ) from None
        # What config.py checks for http.listen, checked for systemd's listeners here.
        self.reachable = [_describe(s.getsockname()) for s in self.inherited if _reachable(s)]
        if self.reachable and not self.keys:
            raise OSError(
                errno.EINVAL,
                f"http.api_keys_file: systemd passes a listener on {self.reachable[0]} "
                "(edgeagent-http.socket), which other machines reach, so clients must "
                "present a key: set http.api_keys_file (or pass the http-api-keys "
                "credential), or listen on a loopback address",
            )
        self.dispatcher: Optional[Dispatcher] = None
        self.accepting = True
        self.counters: dict[str, int] = {"requests": 0, "unauthorized": 0, "disconnects": 0,
                                         "refused_connections": 0}  # fmt: skip
        self._runner: Optional[web.AppRunner] = None
        self._servers: list[asyncio.AbstractServer] = []
        self.connections = 0  # open, TLS handshakes included
        self.handshakes: set[asyncio.Task[None]] = set()
        self.addresses: list[str] = []
        self._created = http_api.now()

    # --- FrontEnd -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[self._errors])  # fmt: skip
        app.router.add_get("/", self._page)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/edgeagent/results/{id}", self._result)
        # A client that goes away cancels its handler, which cancels its generation. An idle
        # connection (also one that never finishes its request) is closed after
        # KEEPALIVE_S, and at most max_connections are open at once (_Gate).
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_S,
                               keepalive_timeout=KEEPALIVE_S)  # fmt: skip
        await runner.setup()
        self._runner = runner
        loop = asyncio.get_running_loop()
        assert runner.server is not None
        handler_factory = runner.server

        def gated() -> asyncio.Protocol:
            return _Gate(self, handler_factory)

        for sock in self.inherited:
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(gated, **inherited_listener_args(sock))
            else:
                server = await loop.create_server(gated, **inherited_listener_args(sock))
            self._servers.append(server)
            self.addresses.append(_describe(sock.getsockname()))
        if self.inherited:
            log.info("HTTP on the listeners systemd passed (edgeagent-http.socket); "
                     "http.listen is not used")  # fmt: skip
        for address in () if self.inherited else self.cfg.listen:
            host, port = config.parse_listen(address)
            try:
                if host.startswith("/"):
                    remove_stale_socket(host)
                    server = await loop.create_unix_server(gated, host)
                else:
                    server = await loop.create_server(gated, host, port, reuse_address=True)
            except OSError as exc:
                await self.close()
                reason = exc.strerror or str(exc)
                raise OSError(
                    exc.errno, f"http.listen: cannot listen on {address}: {reason}"
                ) from None
            self._servers.append(server)
            self.addresses += [_describe(sock.getsockname()) for sock in server.sockets]
        scheme = "https" if self.tls else "http"
        urls = [a if a.startswith("/") else f"{scheme}://{a}/" for a in self.addresses]
        log.info(
            "chat page and OpenAI API on %s (%s)",
            ", ".join(urls),
            f"{len(self.keys)} API key(s)" if self.keys else "no keys: this box only",
        )

    def attach(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def stop_accepting(self) -> None:
        self.accepting = False  # a request on an open connection: 503 "stopping"
        if self.inherited:
            # systemd keeps these listening: a kiosk that connects from now on waits in the
            # backlog for the next instance, rather than being told this one is stopping.
            for server in self._servers:
                server.close()
            self._servers = []

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        for task in list(self.handshakes):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()  # the open connections, after their last writes
            self._runner = None

    def status(self) -> dict[str, Any]:
        return {"listen": self.addresses, "keys": len(self.keys),
                "connections": self.connections, **self.counters}  # fmt: skip

    def reload_keys(self, cfg: HttpConfig) -> None:
        """Take the keys file as it is now (a reload): a removed key stops working at once.
        A file left without keys is refused while systemd's listeners reach other machines
        (config.py refuses it for http.listen)."""
        keys = config.read_api_keys(cfg)
        if self.reachable and not keys:
            log.error(
                "reload: http.api_keys_file: no keys left, but %s is reachable from other "
                "machines; the %d key(s) from before the reload stay",
                self.reachable[0], len(self.keys),
            )  # fmt: skip
            return
        self.keys = keys
        log.info("HTTP: %d API key(s) after the reload", len(self.keys))

    # --- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error in OpenAI's shape, every response with the security headers."""
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
                exc.status, "http_error"
            )
            response = _error(ApiError(exc.status, exc.reason, code=code))
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = _error(ApiError(500, f"internal error: {type(exc).__name__}",
                                       "server_error", protocol.INTERNAL,
                                       headers=NO_RETRY))  # fmt: skip
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _identity(self, request: web.Request) -> str:
        """The client's identity from its key; raises 401 without a valid one."""
        if not self.keys:
            # Only loopback addresses listen without keys (config.py refuses the rest). A web
            # page elsewhere could still make this box's browser call them; a Host that is not
            # a loopback name means DNS rebinding, which is refused.
            if not _local_request(request):
                raise ApiError(403, "this address answers only requests for localhost",
                               code="forbidden_host")  # fmt: skip
            return LOOPBACK_IDENTITY
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        name = None
        if scheme.lower() == "bearer" and token.isascii():
            given = token.strip().encode()
            for key, key_name in self.keys.items():
                if hmac.compare_digest(key.encode(), given):
                    name = key_name
        if name is None:
            self.counters["unauthorized"] += 1
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                           code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="edgeagent"'})  # fmt: skip
        return f"http-key:{name}"

    def _sink(self, request: web.Request, identity: str, user: str = "") -> HttpSink:
        """One API call's sink; its peer names the address, the key and the `user` given."""
        peer = f"http:{request.remote or 'unix'} {identity}"
        if user:
            peer += f" user={user[:64]!r}"
        return HttpSink(identity, peer, self.cfg.max_inflight_per_key, self.cfg.priority)

    def _ready(self) -> Dispatcher:
        if self.dispatcher is None:
            raise ApiError(503, "the model is loading", "server_error", "loading",
                           headers={"Retry-After": "2"})  # fmt: skip
        if not self.accepting or self.dispatcher.stopping:
            raise ApiError(503, "the daemon is stopping; try another node", "server_error",
                           "stopping")  # fmt: skip
        return self.dispatcher

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            # Also what keeps a form on another site from posting here (it cannot send JSON
            # without the browser asking first, which this server never allows).
            raise ApiError(415, "send the body as application/json", code="unsupported_media")
        try:
            raw = await request.read()
        except web.HTTPException:
            raise
        except ClientPayloadError as exc:  # a body that cannot be decoded (bad gzip, cut off)
            raise ApiError(400, f"unreadable body: {exc}", code=protocol.BAD_REQUEST) from None
        try:
            return protocol.decode(raw)
        except protocol.ProtocolError as exc:
            raise ApiError(400, exc.message, code=protocol.BAD_REQUEST) from None

    # --- routes ---------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        """The chat page for browser kiosks: one static file from the package. It needs no
        key to load; its API calls do, when keys are set (the page asks for one)."""
        body, policy = chat_page()
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": policy})  # fmt: skip

    async def _health(self, request: web.Request) -> web.Response:
        d = self.dispatcher
        if d is None:
            return _json({"status": "loading"}, 503, {"Retry-After": "2"})
        if d.stopping or not self.accepting:
            return _json({"status": "stopping"}, 503)
        engine = d.engine
        return _json({
            "status": "ok",
            "slots_idle": engine.parallel - engine.active,
            "slots_processing": engine.active,
            "queue_depth": engine.queue_depth,
            "queue_size": d.cfg.engine.queue_size,
            "in_flight": d.in_flight,
            # Whether a request that does not say `kb` is answered from the manuals here
            # (the chat page's switch starts so).
            "kb_default": "http" in d.cfg.kb.front_ends,
        })  # fmt: skip

    async def _metrics(self, request: web.Request) -> web.Response:
        self._identity(request)
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.scrape)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        self._identity(request)
        model = {"id": self.model_name, "object": "model", "created": self._created,
                 "owned_by": "edgeagent"}  # fmt: skip
        return _json({"object": "list", "data": [model]})

    async def _result(self, request: web.Request) -> web.Response:
        identity = self._identity(request)
        d = self._ready()
        if d.escalator is None:
            raise ApiError(404, "escalation is off on this node", code="not_found")
        # The socket's and MQTT's `result` op: the same id check, the same per-client bound on
        # lookups pending (the spool has one database thread), the same scoping to the key.
        key = request.match_info["id"]
        sink = self._sink(request, identity)
        d.handle_decoded({"op": "result", "id": key}, sink)
        try:
            event = await sink.events.get()
        finally:
            sink.gone = True
        if event["event"] == "error":
            raise ApiError.from_event(event, d.stopping)
        if event.get("status") == "unknown":
            raise ApiError(404, f"no escalation {key!r} of this client", code="not_found")
        return _json(event)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, "chat", "chatcmpl-")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, "text", "cmpl-")

    async def _call(self, request: web.Request, kind: str, prefix: str) -> web.StreamResponse:
        identity = self._identity(request)
        d = self._ready()
        body = await self._body(request)
        rid = prefix + os.urandom(12).hex()
        obj, call = http_api.parse_call(body, kind, rid, self.model_name)
        self.counters["requests"] += 1
        user = body.get("user")
        sink = self._sink(request, identity, user if isinstance(user, str) else "")
        d.handle_decoded(obj, sink)
        try:
            first = await sink.events.get()
            if first["event"] == "error":
                raise ApiError.from_event(first, d.stopping)
            if not call.stream:
                return await self._whole(call, rid, sink, first, d)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                **SECURITY_HEADERS,
            })  # fmt: skip
            try:
                await response.prepare(request)
                await self._stream(response, call, rid, sink, first)
            except ConnectionResetError:
                log.debug("%s went away during %s", sink.peer, rid)
            return response
        finally:
            if not sink.finished:
                # The client went away (its handler was cancelled) or writing to it failed:
                # stop its generation at the next token.
                self.counters["disconnects"] += 1
                sink.gone = True
                d.sink_closed(sink)
            sink.gone = True

    async def _whole(self, call: Call, rid: str, sink: HttpSink, event: Event,
                     d: Dispatcher) -> web.Response:  # fmt: skip
        while event["event"] not in FINAL_EVENTS:
            event = await sink.events.get()
        if event["event"] == "error":
            raise ApiError.from_event(event, d.stopping)
        return _json(http_api.response(call, rid, http_api.now(), event))

    async def _stream(self, response: web.StreamResponse, call: Call, rid: str, sink: HttpSink,
                      event: Event) -> None:  # fmt: skip
        """Server-Sent Events: a chunk per token, the end, then `data: [DONE]`."""
        created = http_api.now()
        opened = http_api.role_chunk(call, rid, created)
        if opened is not None:
            await response.write(http_api.sse(opened))
        while True:
            kind = event["event"]
            if kind == "token":
                await response.write(http_api.sse(http_api.chunk(call, rid, created,
                                                                  event["text"])))  # fmt: skip
            elif kind == "citations":
                # The manuals' passages, before the first token: edgeagent's own field on a
                # chunk with an empty delta (docs/http.md), which stock clients pass over.
                cites = {"citations": event["citations"], "search_ms": event.get("search_ms")}
                await response.write(http_api.sse(http_api.chunk(call, rid, created, **cites)))
            elif kind == "restart":
                # The tokens sent so far are void (a cloud answer that broke off): edgeagent's
                # own field, documented in docs/http.md.
                restart = {"reason": event.get("reason", "")}
                await response.write(http_api.sse(http_api.chunk(call, rid, created,
                                                                  restart=restart)))  # fmt: skip
            elif kind == "done":
                for piece in http_api.final_chunks(call, rid, created, event):
                    await response.write(http_api.sse(piece))
                break
            elif kind == "error":
                error = ApiError.from_event(event, bool(self.dispatcher and
                                                        self.dispatcher.stopping))  # fmt: skip
                partial = event.get("text")
                body = error.body()
                if partial:
                    body["text"] = partial
                await response.write(http_api.sse(body))
                break
            event = await sink.events.get()
        await response.write(http_api.sse("[DONE]"))
        await response.write_eof()


@functools.lru_cache(maxsize=1)
def chat_page() -> tuple[bytes, str]:
    """The page's bytes, and a Content-Security-Policy that lets only its own inline script
    and style run (by their hashes: no other script, no inline handler, no frame) and lets it
    connect only to this server."""
    body = resources.files("edgeagent").joinpath(CHAT_PAGE).read_bytes()

    def digest(tag: str) -> str:
        found = re.search(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), body, re.S)
        if found is None:
            raise RuntimeError(f"{CHAT_PAGE} has no <{tag}>")
        return "'sha256-" + base64.b64encode(hashlib.sha256(found.group(1)).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return body, policy


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted off once when the connection ends.

    Behind TLS, the TLS layer can pass on the request's first bytes before `connection_made`
    (start_tls leaves that call to its caller): they wait here until aiohttp has its transport.
    """

    def __init__(self, front: HttpFrontEnd, inner: Any) -> None:
        self.front, self.inner = front, inner
        self.made = self.released = self.early_eof = False
        self.early: list[bytes] = []

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.front.connections -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.made:
            return
        self.made = True
        self.inner.connection_made(transport)
        for data in self.early:
            self.inner.data_received(data)
        self.early = []
        if self.early_eof:
            self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.made:
            self.inner.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> Optional[bool]:
        if not self.made:
            self.early_eof = True
            return True
        result: Optional[bool] = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.release()
        if self.made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.made:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.made:
            self.inner.resume_writing()


class _Gate(asyncio.Protocol):
    """The first protocol of every accepted connection, before TLS and before aiohttp: it
    turns away connections past `[http] max_connections` with a 503, so that clients that
    connect and never send a request (or never finish a TLS handshake) cannot use up the
    daemon's file descriptors, which the terminals' socket and the spool need too."""

    def __init__(self, front: HttpFrontEnd, factory: Callable[[], Any]) -> None:
        self.front, self.factory = front, factory
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front = self.front
        assert isinstance(transport, asyncio.Transport)
        if front.connections >= front.cfg.max_connections:
            front.counters["refused_connections"] += 1
            if front.tls is None:
                error = ApiError(503, "too many connections; retry later", "server_error",
                                 protocol.BUSY)  # fmt: skip
                body = json.dumps(error.body()).encode()
                transport.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            transport.close()
            return
        front.connections += 1
        counted = _Counted(front, self.factory())
        if front.tls is None:
            transport.set_protocol(counted)
            counted.connection_made(transport)
            return
        # start_tls pauses reading and takes the transport over before the first read.
        self.transport = transport
        task = asyncio.get_running_loop().create_task(self._handshake(transport, counted))
        front.handshakes.add(task)
        task.add_done_callback(front.handshakes.discard)
        task.add_done_callback(functools.partial(_handshake_over, counted, transport))

    def data_received(self, data: bytes) -> None:
        # Only before start_tls has taken the transport: a hello the TLS layer would never
        # see, so the handshake could only time out.
        if self.transport is not None:
            self.transport.abort()

    async def _handshake(self, transport: asyncio.Transport, counted: _Counted) -> None:
        assert self.front.tls is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, counted, self.front.tls, server_side=True,
                ssl_handshake_timeout=HANDSHAKE_S,
            )  # fmt: skip
        except Exception as exc:  # a failed, silent or cut-off handshake
            log.debug("HTTP: TLS handshake failed: %s", exc)
            return
        if tls is not None:  # None: the connection went away as the handshake ended
            counted.connection_made(tls)


def _handshake_over(counted: _Counted, transport: asyncio.Transport, _task: Any) -> None:
    """A handshake that did not hand the connection to aiohttp (failed, timed out, or was
    cancelled by a stop, even before it began) closes it and counts it off."""
    if not counted.made:
        counted.release()
        transport.abort()


def _local_request(request: web.Request) -> bool:
    """A request on a Unix socket, or one whose Host names a loopback address."""
    transport = request.transport
    if transport is not None and isinstance(transport.get_extra_info("sockname"), (str, bytes)):
        return True
    found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::\d+)?|([^:\[\]]+)(?::\d+)?",
                         request.headers.get("Host", ""))  # fmt: skip
    return found is not None and config.is_loopback(found.group(1) or found.group(2))


def _reachable(sock: socket.socket) -> bool:
    """Whether other machines can reach this listener: any TCP address but a loopback one."""
    if sock.family == socket.AF_UNIX:
        return False
    return not config.is_loopback(sock.getsockname()[0])


def _describe(address: Any) -> str:
    if isinstance(address, bytes):  # an abstract Unix socket
        return "@" + address[1:].decode(errors="replace")
    if isinstance(address, str):
        return address
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
