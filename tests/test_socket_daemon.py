"""End to end: a real daemon process, the real model, a real Unix socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Conn, Daemon, config_text, connect

ASK = "What does the abbreviation PLC mean in industrial automation?"


def test_streams_tokens_then_done_with_the_full_text(conn: Conn) -> None:
    conn.send({"id": "q1", "messages": [{"role": "user", "content": ASK}], "max_tokens": 24})
    events = conn.until_final("q1")
    tokens, done = events[:-1], events[-1]
    assert done["event"] == "done", done
    assert tokens and all(e["event"] == "token" for e in tokens)
    assert "".join(e["text"] for e in tokens) == done["text"]
    assert "Programmable Logic Controller".lower() in done["text"].lower()
    assert done["source"] == "local"
    usage = done["usage"]
    assert usage["completion_tokens"] == len(tokens) or usage["completion_tokens"] >= 1
    assert usage["prompt_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert done["timings"]["ttft_ms"] > 0 and done["timings"]["tokens_per_s"] > 0


def test_prompt_form_and_stream_false_give_only_done(conn: Conn) -> None:
    conn.send({"id": "p1", "prompt": "Say the word 'ready'.", "stream": False, "max_tokens": 8})
    events = conn.until_final("p1")
    assert [e["event"] for e in events] == ["done"]
    assert events[0]["text"].strip()


def test_max_tokens_limits_the_answer(conn: Conn) -> None:
    conn.send({"id": "m1", "prompt": "Write a long essay about conveyor belts.", "max_tokens": 5})
    done = conn.until_final("m1")[-1]
    assert done["event"] == "done"
    assert done["usage"]["completion_tokens"] == 5
    assert done["finish_reason"] == "length"


def test_stop_strings_cut_the_answer(conn: Conn) -> None:
    conn.send(
        {"id": "s1", "prompt": "Count from 1 to 10, separated by commas.", "stop": ["5"],
         "max_tokens": 40}
    )  # fmt: skip
    events = conn.until_final("s1")
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == "stop"
    assert "4" in done["text"] and "5" not in done["text"]
    assert "".join(e["text"] for e in events[:-1]) == done["text"]


def test_several_requests_in_flight_on_one_connection(conn: Conn) -> None:
    for i in range(3):
        conn.send({"id": f"c{i}", "prompt": f"What is {i} plus {i}?", "max_tokens": 12})
    results = conn.collect({"c0", "c1", "c2"})
    for i in range(3):
        finals = [e for e in results[f"c{i}"] if e["event"] in ("done", "error")]
        assert len(finals) == 1 and finals[0]["event"] == "done"
        assert str(2 * i) in finals[0]["text"]


def test_greedy_answers_are_repeatable(conn: Conn) -> None:
    texts = []
    for i in range(2):
        conn.send({"id": f"g{i}", "prompt": ASK, "temperature": 0, "max_tokens": 16})
        texts.append(conn.until_final(f"g{i}")[-1]["text"])
    assert texts[0] == texts[1]


def test_session_follow_up_remembers_and_reuses_the_kv_prefix(conn: Conn) -> None:
    first = {"role": "user", "content": "My name is Ada and I run press line 3. Say hello."}
    conn.send({"id": "t1", "session": "line3", "messages": [first], "max_tokens": 24})
    done1 = conn.until_final("t1")[-1]
    assert done1["event"] == "done"
    # Something else runs in between, so the session's KV state must be restored, not found.
    conn.send({"id": "x", "prompt": "Name a primary colour.", "max_tokens": 6})
    assert conn.until_final("x")[-1]["event"] == "done"
    follow = {"role": "user", "content": "What is my name?"}
    conn.send({"id": "t2", "session": "line3", "messages": [follow], "max_tokens": 16})
    done2 = conn.until_final("t2")[-1]
    assert done2["event"] == "done"
    assert "Ada" in done2["text"]
    usage = done2["usage"]
    # The history came from the daemon (the request carried only the new message) ...
    assert (
        usage["prompt_tokens"]
        > done1["usage"]["prompt_tokens"] + done1["usage"]["completion_tokens"]
    )
    # ... and was not evaluated again: all but the new turn came from the saved KV state.
    assert usage["cached_tokens"] >= done1["usage"]["prompt_tokens"]
    # Without the session the model cannot know the name.
    conn.send({"id": "t3", "messages": [follow], "max_tokens": 16})
    assert "Ada" not in conn.until_final("t3")[-1]["text"]


def test_reset_forgets_a_session(conn: Conn) -> None:
    conn.send({"id": "r1", "session": "tmp", "prompt": "Remember the number 4711.",
               "max_tokens": 8})  # fmt: skip
    assert conn.until_final("r1")[-1]["event"] == "done"
    assert conn.op("reset", session="tmp") == {"event": "reset", "session": "tmp", "found": True}
    conn.send({"id": "r2", "session": "tmp", "prompt": "Hi", "max_tokens": 4})
    done = conn.until_final("r2")[-1]
    assert done["usage"]["prompt_tokens"] < 40  # only the new turn (and the template)


def test_status_op(daemon: Daemon, conn: Conn) -> None:
    status = conn.op("status")
    assert status["node_id"] == "test-node"
    assert status["model"]["name"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert status["model"]["sha256"].startswith("1d9614638d18")
    assert status["state"] == "ready"
    assert status["queue_size"] == 8
    assert 100 < status["rss_mb"] < 2000
    assert status["uptime_s"] > 0
    assert status["requests_served"] >= 0


def test_socket_file_has_the_configured_mode(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket_path).st_mode)
    assert mode == 0o660


# --- every error code -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "rid", "fragment"),
    [
        (b"{not json", None, "invalid JSON"),
        (b'{"id": "u1", "prompt": "caf\xe9"}', None, "invalid UTF-8"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"id": "w1", "prompt": 42}', "w1", "prompt"),
        (b'{"id": "w2", "messages": [{"role": "robot", "content": "x"}]}', "w2", "role"),
        (b'{"id": "w3", "prompt": "x", "max_tokens": "ten"}', "w3", "max_tokens"),
        (b'{"id": "w4", "prompt": "x", "temperature": NaN}', None, "NaN"),
        (b'{"id": "w5", "prompt": "x", "colour": "red"}', "w5", "unknown field"),
        (b'{"id": "w6"}', "w6", "exactly one"),
        (b'{"id": 7, "prompt": "x"}', None, "id"),
        (b'{"op": "reboot"}', None, "unknown op"),
        (b"[" * 100000 + b"]" * 100000, None, "invalid JSON"),
    ],
)
def test_bad_input_gets_bad_request_and_the_connection_stays_usable(
    conn: Conn, payload: bytes, rid: str | None, fragment: str
) -> None:
    conn.send_raw(payload + b"\n")
    event = conn.read()
    assert event["event"] == "error" and event["code"] == "bad_request", event
    assert event["id"] == rid
    assert fragment.lower() in event["message"].lower()
    assert conn.op("status")["event"] == "status"


def test_overlong_line_is_rejected_and_the_next_line_served(daemon: Daemon, conn: Conn) -> None:
    conn.send_raw(b'{"id": "big", "prompt": "' + b"a" * (2 << 20) + b'"}\n')
    event = conn.read()
    assert event["event"] == "error" and event["code"] == "bad_request"
    assert "longer than" in event["message"]
    conn.send({"id": "after", "prompt": "Say OK.", "max_tokens": 4})
    assert conn.until_final("after")[-1]["event"] == "done"


def test_duplicate_id_in_flight_is_rejected(conn: Conn) -> None:
    conn.send({"id": "dup", "prompt": "Describe a lathe.", "max_tokens": 30})
    conn.send({"id": "dup", "prompt": "Describe a mill.", "max_tokens": 30})
    events = conn.until_final("dup")
    first_final = events[-1]
    assert first_final["event"] == "error" and "already in flight" in first_final["message"]
    events = conn.until_final("dup")
    assert events[-1]["event"] == "done"


def test_too_long_prompt(conn: Conn) -> None:
    long_text = "conveyor " * 3000  # well over the 2048-token context
    conn.send({"id": "long", "prompt": long_text, "max_tokens": 8})
    event = conn.until_final("long")[-1]
    assert event["event"] == "error" and event["code"] == "too_long"
    assert "2048" in event["message"]
    conn.send({"id": "ok", "prompt": "Say OK.", "max_tokens": 4})
    assert conn.until_final("ok")[-1]["event"] == "done"


def test_deadline_gives_timeout_with_the_partial_answer(conn: Conn) -> None:
    conn.send({"id": "late", "prompt": "Write a long story about a robot arm.",
               "max_tokens": 200, "deadline_ms": 400})  # fmt: skip
    events = conn.until_final("late")
    final = events[-1]
    assert final["event"] == "error" and final["code"] == "timeout"
    assert final["text"] == "".join(e["text"] for e in events[:-1])
    assert len(events) - 1 < 200


def test_cancel_op_stops_generation(conn: Conn) -> None:
    conn.send({"id": "long1", "prompt": "List 100 machine tools, one per line.",
               "max_tokens": 200})  # fmt: skip
    first = conn.read()
    assert first["event"] == "token" and first["id"] == "long1"
    conn.send({"op": "cancel", "id": "long1"})
    events = [first, *conn.until_final("long1")]
    final = events[-1]
    assert final["event"] == "error" and final["code"] == "cancelled"
    tokens = [e for e in events if e["event"] == "token"]
    assert len(tokens) < 100
    # the cancel op itself is acknowledged
    assert conn.op("cancel", id="long1") == {"event": "cancel", "id": "long1", "found": False}


def test_client_disconnect_cancels_its_requests(daemon: Daemon) -> None:
    with connect(daemon.socket_path) as c:
        c.send({"id": "gone", "prompt": "Write 300 words about pumps.", "max_tokens": 250})
        assert c.read()["event"] == "token"
    # The generation stops within a token or so: the daemon is idle again right away,
    # far sooner than the 250 tokens would take.
    with connect(daemon.socket_path) as c:
        for _ in range(100):
            status = c.op("status")
            if status["in_flight"] == 0:
                break
            time.sleep(0.05)
        assert status["in_flight"] == 0
        assert status["errors"].get("cancelled", 0) >= 1


def test_half_closed_client_still_gets_its_answer(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(daemon.socket_path)
    s.sendall(b'{"id": "hc", "prompt": "Say yes.", "max_tokens": 4}\n')
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    lines = [line for line in data.split(b"\n") if line]
    assert b'"event":"done"' in lines[-1] and b'"id":"hc"' in lines[-1]


def test_full_queue_answers_busy_at_once(daemon_factory: Callable[..., Daemon]) -> None:
    small = daemon_factory(queue_size=1)
    with connect(small.socket_path) as c:
        c.send({"id": "run", "prompt": "Write a long list of tools.", "max_tokens": 120})
        assert c.read()["event"] == "token"  # "run" is generating; the queue is empty
        c.send({"id": "wait", "prompt": "Say A.", "max_tokens": 3})
        c.send({"id": "over", "prompt": "Say B.", "max_tokens": 3})
        results = c.collect({"run", "wait", "over"})
    assert results["over"][-1]["code"] == "busy"
    assert [e["event"] for e in results["over"]] == ["error"]
    assert results["wait"][-1]["event"] == "done"
    assert results["run"][-1]["event"] == "done"


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    with connect(d.socket_path) as idle, connect(d.socket_path) as c:
        assert idle.op("status")["state"] == "ready"
        c.send({"id": "drain", "prompt": "Name three metals.", "max_tokens": 20})
        assert c.read()["event"] == "token"
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        final = c.until_final("drain")[-1]
        assert final["event"] == "done"
        assert d.stop() == 0
        with pytest.raises(EOFError):
            idle.read()  # idle connections are closed at exit
    assert not os.path.exists(d.socket_path)
    assert "Traceback" not in d.log()


def test_a_request_read_just_after_sigterm_is_answered_not_refused(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # A restart's race: the terminal's connection was accepted before the stop, its line is
    # read after it. The listener is already closed (new terminals wait for the next
    # instance), so refusing this one would leave it nowhere to go.
    d = daemon_factory()
    with connect(d.socket_path) as c:
        assert c.op("status")["state"] == "ready"
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(d.socket_path):  # the stop has begun: no new connections
            assert time.monotonic() < deadline
            time.sleep(0.005)
        c.send({"id": "late", "prompt": "Name one metal.", "max_tokens": 3})
        final = c.until_final("late")[-1]
        assert final["event"] == "done", final
        with pytest.raises(EOFError):
            c.read()
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_sigterm_during_a_long_prompt_still_answers_and_exits_zero(
    tmp_path: Path, model_file: Path
) -> None:
    # No time to drain, and a ~3,500-token prompt read in one batch on one thread keeps the
    # engine inside one llama.cpp call for many seconds, past the cancel's grace and the exit's
    # wait for the inference thread: the dispatcher itself must answer, and the exit must not
    # crash.
    text = config_text(n_ctx=4096, engine_extra="drain_timeout_s = 0.0")
    text = text.replace("[model]\n", "[model]\nn_batch = 4096\n") + "[cpu]\nthreads = 1\n"
    d = Daemon(tmp_path, text).start()
    try:
        with connect(d.socket_path) as c:
            c.send({"id": "long", "prompt": "belts move boxes " * 1150, "max_tokens": 4})
            deadline = time.monotonic() + 30
            with connect(d.socket_path) as probe:
                while not probe.op("status")["generating"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            time.sleep(1.0)  # inside the prompt's one llama_decode, which takes far longer
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            events = c.until_final("long")
            assert [e["event"] for e in events] == ["error"], events
            assert events[0]["code"] == "cancelled"
            with pytest.raises(EOFError):
                c.read()  # nothing more for it, and the connection is closed
        assert d.stop() == 0, d.log()
    finally:
        d.stop()
    assert "still running after the cancel" in d.log()
    assert "still inside llama.cpp; exiting without it" in d.log()
    assert "Traceback" not in d.log()


def test_clients_that_hang_up_at_once_leave_no_errors(daemon: Daemon) -> None:
    for i in range(30):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket_path)
        s.sendall(b'{"op": "status"}\n' if i % 3 else b'{"id": "x", "prompt": "hi"}\n')
        if i % 3 == 1:
            s.recv(65536)  # read the reply, then hang up
        s.close()
    with connect(daemon.socket_path) as c:
        assert c.op("status")["state"] == "ready"
    assert "Traceback" not in daemon.log()
