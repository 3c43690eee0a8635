"""The `internal` error path: an engine failure becomes an error event, the daemon stays up.

No real failure of the model can be provoked on demand, so this test uses a named fake:
`ExplodingEngine` is the real Engine class (queue, inference thread, error mapping) with the
model load skipped and prompt building replaced by an exception. The socket server, dispatcher and
wire format are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from edgeagent import config
from edgeagent.cpu import Placement
from edgeagent.dispatcher import Dispatcher
from edgeagent.engine import Engine
from edgeagent.job import Job
from edgeagent.socket_server import SocketServer


class ExplodingEngine(Engine):
    """Fake: loads nothing, and every generation raises."""

    def _load(self) -> None:
        pass

    def _build_prompt(self, job: Job, *_args: Any) -> Any:
        raise RuntimeError("simulated inference failure")


def test_engine_exception_becomes_internal_error_and_service_continues(tmp_path: Path) -> None:
    sock_path = tmp_path / "t.sock"
    cfg = config.parse(f'[socket]\npath = "{sock_path}"\n', "t.toml")

    async def scenario() -> list[dict[str, object]]:
        loop = asyncio.get_running_loop()
        engine = ExplodingEngine(cfg, Path("/nonexistent"), "fake", "0")
        engine.start(Placement((0,), (0,), 1, "test"))
        dispatcher = Dispatcher(cfg, engine, loop)
        server = SocketServer(cfg.socket, dispatcher)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        events = []
        for rid in ("e1", "e2"):
            writer.write(json.dumps({"id": rid, "prompt": "x"}).encode() + b"\n")
            events.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
        writer.write(b'{"op": "status"}\n')
        events.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
        writer.close()
        await server.stop_accepting()
        engine.stop()
        return events

    e1, e2, status = asyncio.run(scenario())
    for rid, event in (("e1", e1), ("e2", e2)):
        assert event == {
            "event": "error", "id": rid, "code": "internal",
            "message": "simulated inference failure",
        }  # fmt: skip
    assert status["event"] == "status"
    assert status["errors"] == {"internal": 2}
