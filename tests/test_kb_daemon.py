"""Grounded answers end to end: a real daemon and model, a knowledge base filled by the real
`edgeagent kb` command (while the daemon runs), questions with `kb` over the socket."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Conn, Daemon, connect, kb_add
from tests.test_kb import MANUAL_HTML


@pytest.fixture
def grounded(manuals: tuple[Daemon, Path]) -> tuple[Daemon, Path]:
    """The suite's box with manuals (conftest `manuals`): the filler's in line-3 and the
    labeller's in line-2, with vectors; its HTTP requests use them by default."""
    return manuals


add = kb_add  # `edgeagent kb add`, the real command


def ask(conn: Conn, rid: str, prompt: str, **fields: Any) -> list[dict[str, Any]]:
    conn.send({"id": rid, "prompt": prompt, "max_tokens": 48, **fields})
    return conn.until_final(rid)


def test_citations_come_before_the_first_token_and_with_done(
    grounded: tuple[Daemon, Path],
) -> None:
    daemon, _ = grounded
    with connect(daemon.socket_path) as c:
        events = ask(c, "k1", "What torque for the M8 flange bolts?", kb=True)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "citations" and kinds[-1] == "done", kinds
    cites = events[0]["citations"]
    assert cites[0]["n"] == 1 and cites[0]["doc"] == "Filler F3 operating manual"
    assert cites[0]["section"].endswith("Maintenance") and "25 Nm" in cites[0]["text"]
    done = events[-1]
    assert done["source"] == "local" and done["citations"] == cites
    # The passages were read with the question: the prompt is longer than the question alone.
    with connect(daemon.socket_path) as c:
        plain = ask(c, "k2", "What torque for the M8 flange bolts?")[-1]
    assert "citations" not in plain
    assert done["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 40


def test_a_question_the_manuals_do_not_cover_is_not_guessed(grounded: tuple[Daemon, Path]) -> None:
    daemon, _ = grounded
    shape = {"type": "object", "properties": {"steps": {"type": "string"}}}
    with connect(daemon.socket_path) as c:
        events = ask(c, "n1", "How do I bake sourdough bread?", kb=True)
        shaped = ask(c, "n2", "How do I bake sourdough bread?", kb=True, format=shape)
    done = events[-1]
    assert done["event"] == "done" and done["source"] == "kb", done
    assert done["finish_reason"] == "not_covered" and "do not cover" in done["text"]
    assert "usage" not in done  # the model was not asked
    # A machine waiting for JSON of a shape gets an error, not prose in its place.
    final = shaped[-1]
    assert final["event"] == "error" and final["code"] == "not_covered", final
    assert "do not cover" in final["message"]


def test_a_manual_added_while_running_is_found_and_collections_filter(
    grounded: tuple[Daemon, Path],
) -> None:
    daemon, work = grounded
    (work / "press.html").write_text(MANUAL_HTML)
    add(work / "kb.sqlite", work / "press.html", "line-4", config=work / "kb.toml")
    # The status says what the box holds, without a question (a fleet's check).
    with connect(daemon.socket_path) as c:
        deadline = time.monotonic() + 30
        while (kb_status := c.op("status")["kb"])["documents"] != 3:
            assert time.monotonic() < deadline, kb_status
            time.sleep(0.05)
    assert kb_status["passages"] >= 5 and kb_status["vectors"], kb_status
    assert kb_status["path"] == str(work / "kb.sqlite") and kb_status["waiting"] == 0
    assert kb_status["searches"] >= 1 and kb_status["search_ms_p95"] is not None
    with connect(daemon.socket_path) as c:
        found = ask(c, "a1", "What does alarm E042 mean on the press?", kb=True)
        only_3 = ask(c, "a2", "What does alarm E042 mean on the press?", kb=["line-3"])
        bad = ask(c, "a3", "x", kb="yes")
    assert found[0]["citations"][0]["doc"] == "Press P4", found[0]
    assert all(cite["doc"] != "Press P4" for cite in only_3[0]["citations"])
    assert bad[-1]["code"] == "bad_request" and "`kb`" in bad[-1]["message"]


def test_a_stock_client_streams_the_citations_before_the_first_token(
    grounded: tuple[Daemon, Path],
) -> None:
    """Over HTTP, the OpenAI SDK reads the passages from a chunk with an empty delta before
    the answer's first words, and again beside the finish reason; `kb` is an extra body field
    (this box's HTTP requests use the manuals unless they say otherwise: /health says so)."""
    daemon, _ = grounded
    sdk = openai.OpenAI(base_url=f"{daemon.http_url}/v1", api_key="none", max_retries=0)
    stream = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Torque for the M8 flange bolts?"}],
        max_tokens=24, stream=True, extra_body={"kb": True},
    )  # fmt: skip
    chunks = list(stream)
    extra = [c.model_extra or {} for c in chunks]
    with_cites = [i for i, e in enumerate(extra) if "citations" in e]
    words = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content]
    assert with_cites and words and with_cites[0] < words[0], extra
    first = extra[with_cites[0]]
    assert first["citations"][0]["doc"] == "Filler F3 operating manual" and first["search_ms"] >= 0
    assert chunks[with_cites[0]].choices[0].delta.content is None
    assert chunks[-1].choices[0].finish_reason and extra[-1]["citations"] == first["citations"]
    health = json.loads(urllib.request.urlopen(f"{daemon.http_url}/health", timeout=10).read())
    assert health["kb_default"] is True


def test_no_knowledge_base_is_a_clear_error(conn: Conn) -> None:
    final = ask(conn, "z1", "What torque?", kb=True)[-1]
    assert final["code"] == "bad_request" and "no knowledge base" in final["message"], final
