"""End to end over MQTT: real mosquitto brokers, real daemons, the real model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Daemon, connect
from tests.mqtt_helpers import Broker, Requester

ASK = "edgeagent/{node}/ask"


def mqtt_section(broker: Broker, **overrides: object) -> str:
    values: dict[str, object] = {
        "enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive": 2,
        "reconnect_min_s": 1, "reconnect_max_s": 2, "max_payload_bytes": 8192,
        "metrics_interval_s": 1.0,
    }  # fmt: skip
    values.update(overrides)
    return "[mqtt]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def mqtt_daemon(broker: Broker, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(extra=mqtt_section(broker))


@pytest.fixture
def requester(broker: Broker, mqtt_daemon: Daemon) -> Iterator[Requester]:
    r = Requester(broker.port)
    yield r
    r.close()


def test_status_is_retained_online_with_details(mqtt_daemon: Daemon, requester: Requester) -> None:
    status, _ = requester.next(topic="edgeagent/test-node/status")
    assert status["state"] == "online"
    assert status["model"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert status["version"] and status["cores"] and status["threads"] >= 1
    assert status["ask_topic"] == "edgeagent/test-node/ask"


def test_mosquitto_rr_gets_the_answer(broker: Broker, mqtt_daemon: Daemon) -> None:
    res = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
         ASK.format(node="test-node"), "-e", "replies/rr", "-W", "60", "-m",
         json.dumps({"id": "rr1", "prompt": "What does CNC stand for?", "max_tokens": 16,
                     "stream": False})],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    assert done["event"] == "done" and done["id"] == "rr1" and done["node_id"] == "test-node"
    assert "numerical control" in done["text"].lower()


def test_v5_correlation_data_is_echoed_on_every_event(requester: Requester) -> None:
    corr = b"\x00corr-\xff-1"
    requester.publish(
        ASK.format(node="test-node"), {"prompt": "List five hand tools.", "max_tokens": 40},
        correlation=corr, response_topic=requester.reply_topic,
    )  # fmt: skip
    events = []
    while True:
        event, got = requester.next()
        assert got == corr
        events.append(event)
        if event["event"] in ("done", "error"):
            break
    done = events[-1]
    assert done["event"] == "done", done
    tokens = [e for e in events if e["event"] == "token"]
    assert tokens and "".join(e["text"] for e in tokens) == done["text"]
    # Without an id in the payload the daemon names the request after the correlation data.
    assert {e["id"] for e in events} == {corr.hex()}
    # Tokens are coalesced: fewer token messages than tokens.
    assert len(tokens) < done["usage"]["completion_tokens"]


def test_v311_reply_to_and_id(broker: Broker, mqtt_daemon: Daemon) -> None:
    r = Requester(broker.port, v5=False)
    try:
        r.publish(ASK.format(node="test-node"),
                  {"id": "v3", "reply_to": r.reply_topic, "prompt": "Say hello.",
                   "max_tokens": 8})  # fmt: skip
        events = r.finals({"v3"})["v3"]
        assert events[-1]["event"] == "done"
        assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"]
    finally:
        r.close()


@pytest.mark.parametrize(
    ("payload", "fragment", "rid"),
    [
        (b"{oops", "invalid JSON", None),
        (b'{"prompt": "caf\xe9"}', "invalid UTF-8", None),
        (b'{"id": "t1", "prompt": 5}', "prompt", "t1"),
        (b'{"id": "t2", "prompt": "x", "colour": 1}', "unknown field", "t2"),
        (b'{"id": "t3", "prompt": "x", "reply_to": "a/+/b"}', "reply_to", "t3"),
        (b'{"id": "t4", "prompt": "' + b"x" * 9000 + b'"}', "over the 8192-byte limit", None),
    ],
)
def test_bad_payloads_get_an_error_reply(
    requester: Requester, payload: bytes, fragment: str, rid: str | None
) -> None:
    requester.publish(ASK.format(node="test-node"), payload, correlation=b"bad",
                      response_topic=requester.reply_topic)  # fmt: skip
    event, corr = requester.next()
    assert event["event"] == "error" and event["code"] == "bad_request", event
    assert fragment in event["message"] and event["id"] == rid and corr == b"bad"


def test_requests_with_no_way_to_reply_are_dropped_and_the_next_is_served(
    broker: Broker, mqtt_daemon: Daemon
) -> None:
    r = Requester(broker.port, v5=False)
    try:
        r.publish(ASK.format(node="test-node"), b"{not json at all")
        r.publish(ASK.format(node="test-node"), {"id": "nr", "prompt": "hi"})  # no reply_to
        r.publish(ASK.format(node="test-node"),
                  {"id": "ok", "reply_to": r.reply_topic, "prompt": "Say OK.",
                   "max_tokens": 4})  # fmt: skip
        assert r.finals({"ok"})["ok"][-1]["event"] == "done"
    finally:
        r.close()
    assert "dropping a request on edgeagent/test-node/ask with no way to reply" in (
        mqtt_daemon.log()
    )


def test_status_and_cancel_ops_over_mqtt(requester: Requester) -> None:
    topic = ASK.format(node="test-node")
    requester.publish(topic, {"op": "status"}, response_topic=requester.reply_topic)
    status, _ = requester.next()
    assert status["event"] == "status" and status["mqtt"]["connected"] is True
    requester.publish(topic, {"id": "long", "prompt": "Write 200 words on pumps.",
                              "max_tokens": 200}, response_topic=requester.reply_topic)  # fmt: skip
    first, _ = requester.next()
    assert first["event"] == "token"
    requester.publish(topic, {"op": "cancel", "id": "long"}, response_topic=requester.reply_topic)
    events = requester.finals({"long"})["long"]
    assert events[-1]["code"] == "cancelled"


def test_metrics_are_published(requester: Requester) -> None:
    requester.client.subscribe("edgeagent/test-node/metrics", 0)
    metrics, _ = requester.next(topic="edgeagent/test-node/metrics", timeout=10)
    for key in ("queue_depth", "requests_served", "errors", "ttft_ms_p50", "ttft_ms_p95",
                "tokens_per_s_p50", "rss_mb", "cpu_percent", "load_avg", "cpu_temp_c"):  # fmt: skip
        assert key in metrics
    assert metrics["rss_mb"] > 100


def test_last_will_on_kill_and_offline_on_clean_stop(
    broker: Broker, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(extra=mqtt_section(broker, client_id="lwt-node", topic_prefix="lwt"))
    r = Requester(broker.port)
    try:
        r.client.subscribe("lwt/#", 1)
        status, _ = r.next(topic="lwt/test-node/status", timeout=10)
        assert status["state"] == "online"
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        status, _ = r.next(topic="lwt/test-node/status", timeout=15)  # keepalive 2 s x 1.5
        assert status == {"state": "offline", "node_id": "test-node", "reason": "connection lost"}
        d.start()
        status, _ = r.next(topic="lwt/test-node/status", timeout=15)
        assert status["state"] == "online"
        assert d.stop() == 0
        status, _ = r.next(topic="lwt/test-node/status", timeout=15)
        assert status == {"state": "offline", "node_id": "test-node", "reason": "shutdown"}
    finally:
        r.close()


def test_broker_restart_mid_batch_loses_nothing_and_answers_once(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    b = Broker(tmp_path).start()
    d = daemon_factory(extra=mqtt_section(b, client_id="restart-node"))
    r = Requester(b.port, persistent=True)
    try:
        r.wait_online()  # ready means the model is loaded; MQTT connects in the background
        ids = {f"b{i}" for i in range(8)}
        for rid in sorted(ids):
            r.publish(ASK.format(node="test-node"),
                      {"id": rid, "prompt": f"Name a tool that starts with {rid[-1]}.",
                       "max_tokens": 24}, response_topic=r.reply_topic)  # fmt: skip
        first, _ = r.next()
        assert first["id"] == "b0"
        b.stop()  # mid-batch: b0 generating, the rest queued in the daemon
        time.sleep(2)
        b.start()
        events = r.finals(ids, timeout=240)
        late = r.drain(3)  # anything answered twice would show up here
    finally:
        r.close()
        b.stop()
    for rid in ids:
        finals = [e for e in events[rid] + late if e.get("id") == rid and e["event"] in
                  ("done", "error")]  # fmt: skip
        assert len(finals) == 1 and finals[0]["event"] == "done", (rid, finals)
    assert "MQTT connection lost" in d.log()


def test_two_daemons_share_one_request_stream(
    broker: Broker, daemon_factory: Callable[..., Daemon]
) -> None:
    group = mqtt_section(broker, shared_group="line", topic_prefix="shared")
    a = daemon_factory(node_id="box-a", extra=group)
    b = daemon_factory(node_id="box-b", extra=group)
    r = Requester(broker.port)
    try:
        time.sleep(1)  # both subscriptions in place
        ids = {f"s{i}" for i in range(8)}
        for rid in sorted(ids):
            r.publish("shared/ask", {"id": rid, "prompt": "Say one word.", "max_tokens": 3,
                                     "stream": False}, response_topic=r.reply_topic)  # fmt: skip
        events = r.finals(ids)
        late = r.drain(2)
    finally:
        r.close()
    answered_by = [events[rid][-1]["node_id"] for rid in sorted(ids)]
    assert set(answered_by) == {"box-a", "box-b"}, answered_by
    assert all(len(events[rid]) == 1 and events[rid][0]["event"] == "done" for rid in ids)
    assert not late
    for d in (a, b):
        with connect(d.socket_path) as c:
            assert c.op("status")["requests_served"] >= 1


def test_username_password_and_acl_denial(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    acl = (
        "user edge\ntopic readwrite edgeagent/#\ntopic readwrite replies/#\n"
        "user client\ntopic readwrite edgeagent/#\ntopic readwrite replies/#\n"
        "user locked\ntopic readwrite edgeagent/#\n"
    )
    b = Broker(tmp_path, users={"edge": "s3cret-edge", "client": "c1", "locked": "l1"},
               acl=acl).start()  # fmt: skip
    pw = tmp_path / "edge.pw"
    pw.write_text("s3cret-edge\n")
    try:
        ok = daemon_factory(extra=mqtt_section(b, username="edge", password_file=str(pw),
                                               client_id="auth-ok"))  # fmt: skip
        r = Requester(b.port, username="client", password="c1")
        try:
            r.wait_online()
            r.publish(ASK.format(node="test-node"), {"id": "a1", "prompt": "Say OK.",
                      "max_tokens": 4}, response_topic=r.reply_topic)  # fmt: skip
            assert r.finals({"a1"})["a1"][-1]["event"] == "done"
        finally:
            r.close()
        assert "s3cret-edge" not in ok.log()
        ok.stop()

        wrong = tmp_path / "wrong.pw"
        wrong.write_text("nope\n")
        bad = daemon_factory(extra=mqtt_section(b, username="edge", password_file=str(wrong),
                                                client_id="auth-bad"))  # fmt: skip
        deadline = time.monotonic() + 20
        while "refused the connection" not in bad.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "MQTT broker refused the connection: Bad user name or password" in bad.log() or \
            "MQTT broker refused the connection: Not authorized" in bad.log()  # fmt: skip
        with connect(bad.socket_path) as c:  # the socket keeps serving without the broker
            status = c.op("status")
            assert status["mqtt"]["connected"] is False and status["state"] == "ready"
        bad.stop()

        # "locked" may take requests but not publish replies: the broker refuses them.
        locked_pw = tmp_path / "locked.pw"
        locked_pw.write_text("l1\n")
        denied = daemon_factory(extra=mqtt_section(b, username="locked",
                                                   password_file=str(locked_pw),
                                                   client_id="auth-acl"))  # fmt: skip
        r = Requester(b.port, username="client", password="c1")
        try:
            r.wait_online()
            r.publish(ASK.format(node="test-node"), {"id": "a2", "prompt": "Say OK.",
                      "max_tokens": 4}, response_topic=r.reply_topic)  # fmt: skip
            assert r.drain(3) == []  # nothing reaches the client ...
        finally:
            r.close()
        deadline = time.monotonic() + 20
        refusal = f"MQTT broker refused our publish to {r.reply_topic}: Not authorized"
        while refusal not in denied.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert refusal in denied.log()  # ... and the daemon says why
        with connect(denied.socket_path) as c:
            status = c.op("status")
            assert status["mqtt"]["publish_refused"] >= 1 and status["requests_served"] == 1
        denied.stop()
    finally:
        b.stop()


def test_request_taken_by_a_daemon_killed_mid_answer_is_answered_after_restart(
    broker: Broker, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(extra=mqtt_section(broker, client_id="crash-node", topic_prefix="crash"))
    r = Requester(broker.port)
    try:
        r.wait_online("crash/test-node/status")
        r.publish("crash/test-node/ask", {"id": "k1", "prompt": "Describe a lathe in detail.",
                  "max_tokens": 120}, response_topic=r.reply_topic)  # fmt: skip
        first, _ = r.next()
        assert first["event"] == "token"  # the daemon took it and is answering
        d.stop(signal.SIGKILL)
        r.drain(1)
        d.start()  # same client id: the broker's session still holds the unacknowledged request
        events = r.finals({"k1"}, timeout=120)["k1"]
        late = r.drain(2)
    finally:
        r.close()
    finals = [e for e in events + late if e["event"] in ("done", "error")]
    assert len(finals) == 1 and finals[0]["event"] == "done"
