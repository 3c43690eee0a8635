"""Checking an answer against its JSON Schema in a process of its own, with a time limit.

jsonschema's work is not bounded by the size of what it checks: a `pattern` that backtracks
(`^(a+)+$` against a long string), combinators chained through `$ref`, `uniqueItems` over
thousands of items can take minutes. An answer the cloud wrote is held to nothing on this box,
and even a local one can meet such a schema. So the check runs in a child process
(`python -m edgeagent.checker`, JSON lines on its stdin and stdout), and one that takes longer
than CHECK_TIMEOUT_S is killed: the answer is `invalid`, the next check starts a new child.
The thread asking (the inference thread, the spool's) waits at most that long.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import Any, Optional

CHECK_TIMEOUT_S = 2.0
MAX_LINE_BYTES = 64 << 20  # a reply is one short line; this only bounds a broken child


class CheckTimeout(Exception):
    """The check did not end within its time."""


class Checker:
    """The child process and one lock: checks are asked one at a time, from any thread."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self.killed = 0  # checks that ran out of time

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent.checker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )  # fmt: skip
        return self._proc

    def warm(self) -> None:
        """Start the child now (its imports take a few hundred ms), off the request path."""
        with self._lock:
            self._start()

    def errors(self, schema: dict[str, Any], value: Any) -> Optional[str]:
        """Why `value` does not fit `schema` (one message), or None when it fits. Raises
        CheckTimeout when the check took longer than the time limit."""
        line = json.dumps({"schema": schema, "value": value}).encode() + b"\n"
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
                reply = proc.stdout.readline(MAX_LINE_BYTES) if ready else b""
            except OSError:
                reply = b""
            if not reply:
                self._kill()
                raise CheckTimeout(f"checking it took longer than {self.timeout_s:g} s")
        result = json.loads(reply)
        error: Optional[str] = result.get("error")
        return error

    def _kill(self) -> None:
        if self._proc is not None:
            self.killed += 1
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None


def check(schema: dict[str, Any], value: Any) -> Optional[str]:
    """One check, in this process: the child's work."""
    import jsonschema  # noqa: PLC0415
    import referencing  # noqa: PLC0415

    try:
        # An empty registry: a reference is never fetched (structured.py refuses remote ones).
        validator = jsonschema.validators.validator_for(schema)(
            schema, registry=referencing.Registry()
        )
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except Exception as exc:  # a reference that goes in circles or nowhere
        return f"the schema could not be checked: {type(exc).__name__}"
    if error is None:
        return None
    where = "/".join(repr(p) if isinstance(p, str) else str(p) for p in error.absolute_path)
    return f"at {where or 'the top'}: {error.message[:200]}"


def serve() -> int:
    """The child: one JSON request per line in, one reply per line out, until stdin ends."""
    import jsonschema  # noqa: F401, PLC0415 (imported before the first check, not during it)

    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            reply = {"error": check(req["schema"], req["value"])}
        except RecursionError:
            reply = {"error": "the answer or the schema is nested too deeply to check"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


_SHARED = Checker()  # its child starts on the first check


def shared() -> Checker:
    """The process's checker."""
    return _SHARED


if __name__ == "__main__":
    sys.exit(serve())
