"""The daemon's life: config → verified model → engine → listeners → READY; SIGTERM → drain → 0."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from edgeagent import __version__, checker, config, cpu, heap, kb, models
from edgeagent.config import Config
from edgeagent.dispatcher import Dispatcher
from edgeagent.engine import Engine
from edgeagent.escalation import Escalator, default_spool_path
from edgeagent.metrics import Metrics
from edgeagent.mqtt_client import SecretError
from edgeagent.mqtt_link import MqttLink
from edgeagent.socket_server import SocketError, SocketServer
from edgeagent.systemd import Notifier, inherited_sockets, watchdog_interval
from edgeagent.transport import FrontEnd

if TYPE_CHECKING:
    from edgeagent.http_server import HttpFrontEnd

log = logging.getLogger("edgeagent")

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_LISTEN = 4
EXIT_SPOOL = 5
STATUS_INTERVAL_S = 5.0
ENGINE_JOIN_S = 2.0  # at exit, for the inference thread to leave its last llama.cpp call
# At a stop, how long requests on open connections are still taken: the lines of terminals
# accepted just before it (a restart's) are read and answered, not refused.
STOP_GRACE_S = 0.5
THREAD_AFFINITY_TTL_S = 1.0  # how old the threads' affinities in `status` may be

# Keys SIGHUP may change in a running daemon; anything else needs a restart.
RELOADABLE = {
    "log.level",
    "model.max_tokens", "model.temperature", "model.system_prompt",
    "engine.queue_size", "engine.request_timeout_s", "engine.stall_timeout_s",
    "engine.drain_timeout_s", "engine.allow_grammar", "engine.format_max_bytes",
    "engine.format_max_depth", "engine.format_max_repeat", "engine.grammar_max_bytes",
    "socket.max_line_bytes", "socket.max_inflight_per_conn", "socket.max_connections",
    "socket.idle_timeout_s", "socket.max_unsent_bytes",
    "mqtt.token_interval_ms", "mqtt.token_batch", "mqtt.metrics_interval_s",
    "mqtt.max_payload_bytes", "mqtt.max_inflight_per_client",
}  # fmt: skip
SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """`<priority>level logger: message`: journald reads the priority, adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        return f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def resolve_model(cfg: Config) -> tuple[Path, str, str]:
    """(path, name, sha256) of the verified model file; raises models.ModelError."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        sha = models.verify(path, None, cfg.model.sha256 or None)
        return path, path.name, sha
    manifest = models.load_manifest()
    spec = manifest.get(cfg.model.name or manifest.default)
    path = models.model_path(spec)
    return path, spec.name, models.verify(path, spec.size, spec.sha256)


def describe(engine: Engine) -> dict[str, Any]:
    """What this node runs, for the retained MQTT status."""
    placement = engine.placement
    return {
        "version": __version__,
        "model": engine.model_name,
        "model_sha256": engine.model_sha256,
        "n_ctx": engine.cfg.model.n_ctx,
        "threads": engine.n_threads,
        "cores": list(placement.inference) if placement else [],
        "io_cores": list(placement.io) if placement else [],
    }


@functools.lru_cache(maxsize=1)
def _thread_affinity(period: int) -> tuple[tuple[int, str, str], ...]:
    """(tid, name, cores) of every thread from /proc, read again only when `period` (which
    THREAD_AFFINITY_TTL_S-long stretch of the monotonic clock the caller is in) moves on."""
    return tuple(
        (tid, name, cpu.format_cpulist(cores)) for tid, name, cores in cpu.thread_affinities()
    )


def cpu_status(engine: Engine) -> dict[str, Any]:
    """The chosen placement and every thread's real affinity, read back from /proc."""
    p = engine.placement
    if p is None:
        return {}
    # `status` runs on the event loop and a terminal may ask for it many times a second: one
    # read of /proc per thread per THREAD_AFFINITY_TTL_S serves them all.
    period = int(time.monotonic() // THREAD_AFFINITY_TTL_S)
    return {
        "inference_cores": cpu.format_cpulist(p.inference),
        "io_cores": cpu.format_cpulist(p.io),
        "threads": p.threads,
        "reason": p.reason,
        "thread_affinity": [
            {"tid": tid, "name": name, "cores": cores}
            for tid, name, cores in _thread_affinity(period)
        ],
    }


def one_line_status(d: Dispatcher, link: Optional[MqttLink]) -> str:
    s = d.status()
    tps = s["tokens_per_s_p50"]
    mqtt = ""
    if link is not None:
        mqtt = ", MQTT " + ("up" if link.connected.is_set() else "down")
    if d.escalator is not None:
        spooled = d.escalator.spool_counts.get("waiting", 0)
        mqtt += f", cloud {'up' if d.escalator.up else 'down'} ({spooled} spooled)"
    return (
        f"{s['state']}: queue {s['queue_depth']}/{s['queue_size']}, in flight {s['in_flight']}, "
        f"served {s['requests_served']}, "
        f"{'-' if tps is None else f'{tps:.0f}'} tok/s{mqtt}, RSS {s['rss_mb']:.0f} MB"
    )


def reload_config(current: Config, path: Optional[str]) -> tuple[Config, list[str]]:
    """The config with SIGHUP-safe changes from `path` applied, and the keys left for a restart.

    Raises ConfigError when the file is invalid (the running config then stays as it is).
    """
    new = config.load(path)
    sections: dict[str, Any] = {}
    restart: list[str] = []
    for section in dataclasses.fields(Config):
        old_sec: Any = getattr(current, section.name)
        new_sec: Any = getattr(new, section.name)
        if not dataclasses.is_dataclass(old_sec) or isinstance(old_sec, type):
            if old_sec != new_sec and section.name != "source":
                restart.append(section.name)
            continue
        changes = {}
        for f in dataclasses.fields(old_sec):
            key = f"{section.name}.{f.name}"
            before, after = getattr(old_sec, f.name), getattr(new_sec, f.name)
            if before == after:
                continue
            if key in RELOADABLE:
                changes[f.name] = after
            else:
                restart.append(key)
        if changes:
            sections[section.name] = dataclasses.replace(old_sec, **changes)
    merged: Config = dataclasses.replace(current, **sections)
    return merged, restart


async def serve(cfg: Config, started: float) -> int:
    notifier = Notifier()
    try:
        placement = cpu.pick_placement(
            cfg.cpu.cores, cfg.cpu.io_cores, cfg.cpu.threads, cpu.allowed_cores(),
            Path(cfg.cpu.sysfs_root),
        )  # fmt: skip
    except cpu.PlacementError as exc:
        log.error("%s: %s", cfg.source, exc)
        return EXIT_CONFIG
    # The main thread runs the event loop (socket, MQTT hand-offs); threads started from here
    # (paho's, the executor's) inherit the I/O cores. The inference thread pins itself.
    cpu.pin_current_thread(placement.io, "edgeagent")
    log.info("CPU placement: %s", placement.describe())
    try:
        model_file, model_name, sha = resolve_model(cfg)
    except models.ModelError as exc:
        log.error("%s", exc)
        return EXIT_MODEL
    dispatcher: Optional[Dispatcher] = None
    metrics = Metrics(lambda: dispatcher.gauges() if dispatcher is not None else {})
    # HTTP listens while the model loads, so that /health can say so (and a port that is
    # taken ends the start before the load, not after).
    inherited = inherited_sockets()
    if inherited.http and not cfg.http.enabled:
        log.error(
            "%s: http.enabled: false, but systemd passes HTTP listeners (edgeagent-http.socket); "
            "set it to true, or disable that socket unit", cfg.source,
        )  # fmt: skip
        return EXIT_CONFIG
    http: Optional[HttpFrontEnd] = None
    if cfg.http.enabled:
        # aiohttp and its kin are 18 MB of RSS: loaded only where HTTP is on.
        from edgeagent.http_server import HttpFrontEnd  # noqa: PLC0415

        try:
            http = HttpFrontEnd(cfg.http, metrics, model_name, inherited.http)
            await http.start()
        except OSError as exc:
            log.error("%s: %s", cfg.source, exc.strerror or exc)
            return EXIT_CONFIG if http is None else EXIT_LISTEN
    engine = Engine(cfg, model_file, model_name, sha)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, engine.start, placement)
    except Exception as exc:
        log.error("cannot load model %s: %s", model_file, exc)
        if http is not None:
            await http.close()
        return EXIT_MODEL

    # The process that checks structured answers against their schemas (checker.py) starts
    # now, so the first such answer does not wait for its imports.
    checker.shared().warm()
    # The knowledge base's embedding model, when set, loads now like the model: a file that
    # cannot be loaded ends the start, not the first grounded question.
    embedder = None
    if cfg.kb.embedding_model:
        try:
            embedder = await loop.run_in_executor(
                None, kb.Embedder, Path(cfg.kb.embedding_model), cfg.kb.embedding_threads
            )
        except Exception as exc:
            log.error("cannot load kb.embedding_model %s: %s", cfg.kb.embedding_model, exc)
            if http is not None:
                await http.close()
            engine.stop()
            return EXIT_MODEL
    dispatcher = Dispatcher(cfg, engine, loop, embedder)
    dispatcher.prometheus = metrics
    dispatcher.status_sections["cpu"] = lambda: cpu_status(engine)

    async def refuse_start(code: int) -> int:
        if http is not None:
            await http.close()
        engine.stop()
        return code

    def secret_refused(exc: SecretError) -> int:
        log.error("%s: %s", cfg.source, exc)
        return EXIT_CONFIG

    # Both links read their broker's password as they are made, so they are made before
    # anything listens: a secret that cannot be read (a credential the service's user may not
    # open) ends the start with its problem line and exit 2, which systemd does not restart.
    link: Optional[MqttLink] = None
    if cfg.mqtt.enabled:
        try:
            link = MqttLink(cfg, dispatcher, loop, lambda: describe(engine))
        except SecretError as exc:
            return await refuse_start(secret_refused(exc))
        dispatcher.status_sections["mqtt"] = link.status
    escalator: Optional[Escalator] = None
    if cfg.escalation.enabled:
        try:
            escalator = Escalator(cfg, loop)
            await escalator.start()
        except SecretError as exc:
            return await refuse_start(secret_refused(exc))
        except (OSError, sqlite3.Error) as exc:
            where = cfg.escalation.spool_path or default_spool_path()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.error("cannot open the escalation spool %s: %s", where, why)
            return await refuse_start(EXIT_SPOOL)
        dispatcher.escalator = escalator
        dispatcher.status_sections["escalation"] = escalator.status

    server = SocketServer(cfg.socket, dispatcher)
    dispatcher.status_sections["socket"] = server.status
    try:
        await server.start(inherited.terminal)
    except SocketError as exc:
        log.error("%s", exc)
        return await refuse_start(EXIT_LISTEN)
    front_ends: list[FrontEnd] = [server]
    if http is not None:
        http.attach(dispatcher)
        dispatcher.status_sections["http"] = http.status
        front_ends.append(http)
    if link is not None:
        await link.start()
        front_ends.append(link)
    if escalator is not None:
        escalator.followups = link
        await escalator.redeliver()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def apply(new: Config) -> None:
        nonlocal cfg
        cfg = new
        engine.cfg = dispatcher.cfg = new
        server.cfg = new.socket
        if link is not None:
            link.cfg = new
        if http is not None and new.http.enabled:
            http.reload_keys(new.http)  # a key taken out of the file stops working now
        logging.getLogger().setLevel(new.log.level.upper())

    def reload() -> None:
        old = cfg
        try:
            new, restart = reload_config(cfg, None if cfg.source.startswith("<") else cfg.source)
        except config.ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return
        try:
            apply(new)
        except Exception:
            apply(old)  # what was set before the failure goes back
            raise
        log.info("config reloaded from %s", cfg.source)
        for key in restart:
            log.warning("reload: %s changed; it takes effect after a restart", key)

    def on_hup() -> None:
        notifier.reloading()
        try:
            reload()
        except Exception:
            log.exception("reload failed; the running config stays as it was")
        finally:
            # systemd keeps the unit "reloading" until READY=1, whatever went wrong.
            notifier.ready(one_line_status(dispatcher, link))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    ready_s = time.monotonic() - started
    log.info(
        "edgeagent %s ready in %.2f s: node %s, model %s",
        __version__, ready_s, cfg.node_id, model_name,
    )  # fmt: skip
    notifier.ready(one_line_status(dispatcher, link))

    async def refresh_status() -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            notifier.status(one_line_status(dispatcher, link))

    async def feed_watchdog(interval: float) -> None:
        # Liveness means progress: a request stuck past stall_timeout_s stops the pings, and
        # systemd restarts the service. An idle engine is healthy.
        stalled = False
        while True:
            stuck = engine.stalled_for()
            if stuck <= cfg.engine.stall_timeout_s:
                notifier.watchdog()
                if stalled:
                    log.warning("engine moving again; feeding the watchdog")
                stalled = False
            elif not stalled:
                stalled = True
                log.error(
                    "engine made no progress for %.1f s: no longer feeding the watchdog", stuck
                )
            await asyncio.sleep(interval)

    tasks = [asyncio.create_task(refresh_status())]
    interval = watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(feed_watchdog(interval)))
    await stop.wait()

    drain_s = cfg.engine.drain_timeout_s
    log.info("stopping: finishing in-flight requests (up to %.0f s)", drain_s)
    notifier.stopping("draining")
    tasks[0].cancel()
    for front_end in front_ends:
        await front_end.stop_accepting()
    cancelled = await dispatcher.drain(drain_s, STOP_GRACE_S)
    await asyncio.sleep(0.05)  # let the last events reach the sockets
    # MQTT goes last: the escalator's last follow-ups are published through it.
    for front_end in front_ends:
        if front_end is not link:
            await front_end.close()
    if escalator is not None:
        await escalator.stop()
    if link is not None:
        await link.close()
    for task in tasks:
        task.cancel()
    await loop.run_in_executor(None, engine.stop, ENGINE_JOIN_S)
    await loop.run_in_executor(None, dispatcher.close)
    checker.shared().close()
    log.info("stopped (%d request(s) cancelled by the shutdown)", cancelled)
    if engine.thread_alive:
        # Still inside one llama.cpp call (a long prompt) whose request has been answered:
        # the interpreter's exit would free the model under it and crash. Nothing is left to
        # save (connections, MQTT and spool are closed), so leave at once.
        log.warning("the inference thread is still inside llama.cpp; exiting without it")
        logging.shutdown()
        os._exit(0)
    return 0


def run(cfg: Config) -> int:
    started = time.monotonic()
    setup_logging(cfg.log.level)
    heap.tune()
    return asyncio.run(serve(cfg, started))
