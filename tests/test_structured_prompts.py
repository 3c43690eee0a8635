"""Fifty varied factory questions with their schemas (tests/structured_prompts.py) through the
real daemon and model: every constrained answer parses and fits its schema. The same
questions without the constraint are counted by scripts/bench.py (docs/benchmarks.md)."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import jsonschema

from tests.conftest import Daemon, connect
from tests.structured_prompts import MAX_TOKENS, PROMPTS, has_cjk

CONNECTIONS = 4  # as four PLC gateways would: batched with each other


def ask_all(daemon: Daemon, asks: list[tuple[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Each question's final event, asked in order on one connection."""
    out = {}
    with connect(daemon.socket_path, timeout=300) as c:
        for i, fields in asks:
            c.send({"id": f"q{i}", "max_tokens": MAX_TOKENS, "stream": False, **fields})
            out[i] = c.until_final(f"q{i}")[-1]
    return out


def test_fifty_factory_questions_each_get_an_answer_that_fits_its_schema(daemon: Daemon) -> None:
    asks = [(i, {"prompt": prompt, "format": schema}) for i, (_, prompt, schema) in
            enumerate(PROMPTS)]  # fmt: skip
    finals: dict[int, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        for part in pool.map(ask_all, [daemon] * CONNECTIONS,
                             [asks[k::CONNECTIONS] for k in range(CONNECTIONS)]):  # fmt: skip
            finals.update(part)
    failed = {i: f for i, f in finals.items() if f["event"] != "done"}
    assert not failed, failed
    for i, (kind, _prompt, schema) in enumerate(PROMPTS):
        done = finals[i]
        # Checked here again, by the client, from the text as it arrived.
        value = json.loads(done["text"])
        assert value == done["json"], (kind, done)
        jsonschema.validate(value, schema)
    chinese = [finals[i]["json"] for i, p in enumerate(PROMPTS) if p[0] == "chinese"]
    assert sum(has_cjk(v) for v in chinese) >= len(chinese) // 2, chinese
    assert max(f["timings"]["peak_batch"] for f in finals.values()) > 1
