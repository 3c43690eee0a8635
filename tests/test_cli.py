"""The terminal client commands against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, Daemon


def edgeagent(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_ask_streams_the_answer(daemon: Daemon) -> None:
    res = edgeagent("ask", "--socket", daemon.socket_path, "--max-tokens", "16",
                    "What does CNC stand for?")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "numerical control" in res.stdout.lower()


def test_ask_json_prints_events(daemon: Daemon) -> None:
    res = edgeagent("ask", "--socket", daemon.socket_path, "--json", "--max-tokens", "4", "Hi")
    lines = [line for line in res.stdout.splitlines() if line]
    assert '"event": "done"' in lines[-1]
    assert all('"event": "token"' in line for line in lines[:-1])


def test_ask_reports_errors_with_a_non_zero_exit(daemon: Daemon) -> None:
    res = edgeagent("ask", "--socket", daemon.socket_path, "--max-tokens", "100000", "Hi")
    assert res.returncode == 1
    assert "error: bad_request: `max_tokens` must be an integer from 1 to 256" in res.stderr


def test_ask_without_a_daemon(tmp_path: object) -> None:
    res = edgeagent("ask", "--socket", "/nonexistent/edgeagent.sock", "Hi")
    assert res.returncode == 1 and "is the daemon running?" in res.stderr


def test_output_into_a_pipe_whose_reader_left() -> None:
    """`edgeagent config keys | head`: the real CLI writing into a pipe whose read end is
    closed before the first write (so the outcome does not depend on timing), as `head` leaves
    one. No traceback, and 141, the status a shell reports for a tool killed by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "edgeagent", "config", "keys"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert res.stderr == ""
    assert res.returncode == 141
    whole = subprocess.run(
        [sys.executable, "-m", "edgeagent", "config", "keys"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert whole.returncode == 0 and whole.stdout.startswith("node_id = ")


def test_chat_keeps_the_conversation(daemon: Daemon) -> None:
    res = edgeagent(
        "chat", "--socket", daemon.socket_path, "--max-tokens", "20",
        stdin="My favourite machine is the lathe. Say OK.\nWhat is my favourite machine?\n",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    replies = [line for line in res.stdout.splitlines() if "edgeagent>" in line]
    assert len(replies) == 2
    assert "lathe" in replies[1].lower()


def test_status_command(daemon: Daemon) -> None:
    res = edgeagent("status", "--socket", daemon.socket_path)
    assert res.returncode == 0 and '"node_id": "test-node"' in res.stdout
