"""The daemon's life: config → verified model → engine → listeners → READY; SIGTERM → drain → 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from edgeagent import __version__, models
from edgeagent.config import Config
from edgeagent.dispatcher import Dispatcher
from edgeagent.engine import Engine
from edgeagent.mqtt_link import MqttLink
from edgeagent.socket_server import SocketError, SocketServer
from edgeagent.systemd import Notifier, inherited_unix_socket

log = logging.getLogger("edgeagent")

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_LISTEN = 4
STATUS_INTERVAL_S = 5.0
DRAIN_TIMEOUT_S = 10.0


def setup_logging(level: str) -> None:
    # Under journald (JOURNAL_STREAM set) the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt, force=True)


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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def describe(engine: Engine) -> dict[str, Any]:
    """What this node runs, for the retained MQTT status."""
    return {
        "version": __version__,
        "model": engine.model_name,
        "model_sha256": engine.model_sha256,
        "n_ctx": engine.cfg.model.n_ctx,
        "threads": engine.n_threads,
        "cores": sorted(os.sched_getaffinity(0)),
    }


def one_line_status(d: Dispatcher) -> str:
    s = d.status()
    tps = s["tokens_per_s_p50"]
    return (
        f"{s['state']}: queue {s['queue_depth']}/{s['queue_size']}, in flight {s['in_flight']}, "
        f"served {s['requests_served']}, "
        f"{'-' if tps is None else f'{tps:.0f}'} tok/s, RSS {s['rss_mb']:.0f} MB"
    )


async def serve(cfg: Config, started: float) -> int:
    notifier = Notifier()
    try:
        model_file, model_name, sha = resolve_model(cfg)
    except models.ModelError as exc:
        log.error("%s", exc)
        return EXIT_MODEL
    threads = cfg.model.threads or usable_cores()
    engine = Engine(cfg, model_file, model_name, sha)
    try:
        await asyncio.get_running_loop().run_in_executor(None, engine.start, threads)
    except Exception as exc:
        log.error("cannot load model %s: %s", model_file, exc)
        return EXIT_MODEL

    loop = asyncio.get_running_loop()
    dispatcher = Dispatcher(cfg, engine, loop)
    server = SocketServer(cfg.socket, dispatcher)
    try:
        await server.start(inherited_unix_socket())
    except SocketError as exc:
        log.error("%s", exc)
        engine.stop()
        return EXIT_LISTEN

    link: Optional[MqttLink] = None
    if cfg.mqtt.enabled:
        link = MqttLink(cfg, dispatcher, loop, lambda: describe(engine))
        dispatcher.status_sections["mqtt"] = link.status
        link.start()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready_s = time.monotonic() - started
    log.info(
        "edgeagent %s ready in %.2f s: node %s, model %s, %d threads",
        __version__, ready_s, cfg.node_id, model_name, threads,
    )  # fmt: skip
    notifier.ready(one_line_status(dispatcher))

    async def refresh_status() -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            notifier.status(one_line_status(dispatcher))

    status_task = asyncio.create_task(refresh_status())
    await stop.wait()

    log.info("stopping: finishing in-flight requests (up to %.0f s)", DRAIN_TIMEOUT_S)
    notifier.stopping("draining")
    status_task.cancel()
    await server.stop_listening()
    if link is not None:
        link.stop_accepting()
    cancelled = await dispatcher.drain(DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.05)  # let the last events reach the sockets
    server.close_connections()
    if link is not None:
        await link.stop()
    await loop.run_in_executor(None, engine.stop)
    log.info("stopped (%d request(s) cancelled by the shutdown)", cancelled)
    return 0


def run(cfg: Config) -> int:
    started = time.monotonic()
    setup_logging(cfg.log.level)
    return asyncio.run(serve(cfg, started))
