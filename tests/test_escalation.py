"""Escalation end to end: real local and cloud mosquitto brokers, a real OpenAI-compatible server
(llama-cpp-python's `llama_cpp.server` serving the local model as the stand-in for Llama3-8B),
the real `edgeagent cloud-worker` process and real daemons."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import openai
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Conn, Daemon, Process, connect, openai_stand_in
from tests.mqtt_helpers import Broker, Requester, free_port
from tests.structured_prompts import ALARM

STAND_IN = "stand-in-llama3-8b"
NODE = "esc-node"


class Sniffer:
    """Everything published on the cloud broker, to prove what left the box."""

    def __init__(self, port: int) -> None:
        self.payloads: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe("#", 0)
        self.client.on_message = lambda _c, _u, m: self.payloads.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def seen(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.payloads.empty():
            out.append(self.payloads.get())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def stack(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Local broker, cloud broker, OpenAI-compatible server, cloud worker."""
    work = tmp_path_factory.mktemp("cloud")
    local = Broker(tmp_path_factory.mktemp("local-broker")).start()
    cloud = Broker(tmp_path_factory.mktemp("cloud-broker")).start()
    server, port = openai_stand_in(model_file, work / "llama-server.log", STAND_IN)
    worker_cfg = work / "worker.toml"
    worker_cfg.write_text(
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {cloud.port}\nkeepalive = 2\n'
        "reconnect_min_s = 1\nreconnect_max_s = 1\n"
        f'[worker]\nworker_id = "w1"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        f'model = "{STAND_IN}"\nconcurrency = 1\ntoken_interval_ms = 0\nrequest_timeout_s = 60\n'
        'response_format = "llama-cpp"\n'
    )
    worker = Process(
        [sys.executable, "-m", "edgeagent", "cloud-worker", "--config", str(worker_cfg)],
        work / "worker.log",
    ).start()
    yield {"local": local, "cloud": cloud, "server": server, "worker": worker, "work": work,
           "server_url": f"http://127.0.0.1:{port}/v1"}  # fmt: skip
    worker.stop()
    server.stop()
    local.stop()
    cloud.stop()


def daemon_extra(stack: dict[str, Any], workdir_name: str, *, cloud_port: int | None = None,
                 cloud_extra: str = "", **escalation: Any) -> str:  # fmt: skip
    spool = stack["work"] / f"{workdir_name}.sqlite"
    values: dict[str, Any] = {
        "enabled": True, "keywords": ["torque spec"], "patterns": [r"\bE\d{3}\b"],
        # timeout_s: the stand-in reads a 200-token prompt on one thread in 4-5 s when the
        # suite's other daemons are busy too.
        "min_prompt_tokens": 150, "timeout_s": 10.0, "redact": [[r"SN-\d{6}", "[serial]"]],
        "spool_path": str(spool), "max_tokens": 8,
    }  # fmt: skip
    values.update(escalation)
    return (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {stack["local"].port}\n'
        "keepalive = 2\nreconnect_min_s = 1\nreconnect_max_s = 1\n"
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {cloud_port or stack["cloud"].port}\n'
        "keepalive = 2\nreconnect_min_s = 1\nreconnect_max_s = 1\n"
        + cloud_extra
        + "[escalation]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    )


@contextlib.contextmanager
def worker_and_edge(stack: dict[str, Any], daemon_factory: Callable[..., Daemon], name: str,
                    worker: str) -> Iterator[Daemon]:  # fmt: skip
    """A cloud worker of its own (`worker`: its [worker] keys) on the cloud topic prefix
    `<name>-cloud`, and an edge daemon linked to it, for a test that needs a model server
    that fails or misbehaves."""
    work: Path = stack["work"]
    cfg = work / f"{name}-worker.toml"
    cfg.write_text(
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {stack["cloud"].port}\n'
        f'topic_prefix = "{name}-cloud"\n[worker]\nworker_id = "w-{name}"\n{worker}'
    )
    process = Process(
        [sys.executable, "-m", "edgeagent", "cloud-worker", "--config", str(cfg)],
        work / f"{name}-worker.log",
    ).start()
    try:
        extra = daemon_extra(stack, name, cloud_extra=f'topic_prefix = "{name}-cloud"\n')
        d = daemon_factory(node_id=f"esc-{name}", extra=extra)
        wait_link(d, True)
        yield d
    finally:
        process.stop()


def wait_link(daemon: Daemon, up: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with connect(daemon.socket_path) as c:
            status = c.op("status")
        if status["escalation"]["link"]["up"] is up:
            return
        assert time.monotonic() < deadline, (status["escalation"], daemon.log())
        time.sleep(0.2)


PRESS_MANUAL = """# Press P4 manual

## Hydraulic oil

The hydraulic oil of press P4 must stay below 70 C; above it alarm E042 stops the press.
"""
# A private collection's passage, marked so that it can be looked for on the cloud broker.
SECRET_MANUAL = """# Press P4 recipe sheet

## Hydraulic oil settings

For recipe ZX-SECRET-7731 the press P4 hydraulic oil is held at 58 C.
"""


# What line equipment wants back for an alarm (docs/mqtt.md's worked example): ALARM, from
# the fifty factory questions' schemas.


def assert_alarm(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == {"severity", "cause", "next_check"}, value
    assert value["severity"] in ("info", "check", "stop_line"), value
    assert all(isinstance(value[k], str) and len(value[k]) <= 80 for k in ("cause", "next_check"))


@pytest.fixture(scope="module")
def edge(stack: dict[str, Any], daemon_factory: Callable[..., Daemon]) -> Daemon:
    work: Path = stack["work"]
    (work / "alarm.json").write_text(json.dumps(ALARM))
    schemas = f'[mqtt.schemas]\n"ask/alarm" = "{work / "alarm.json"}"\n'
    # The line's manuals: one shared, one in a private collection.
    (work / "press.md").write_text(PRESS_MANUAL)
    (work / "recipes.md").write_text(SECRET_MANUAL)
    for doc, collection in (("press.md", "line-4"), ("recipes.md", "secret")):
        subprocess.run([sys.executable, "-m", "edgeagent", "kb", "add", str(work / doc),
                        "--collection", collection, "--db", str(work / "kb.sqlite")],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
    manuals = f'[kb]\npath = "{work / "kb.sqlite"}"\nprivate = ["secret"]\n'
    # A topic for the HMI gateway's plain-text questions, answered from line 4's manuals.
    schemas += '[mqtt.kb]\n"ask/manuals" = ["line-4"]\n'
    # Requests without max_tokens (plain text on a schema topic) ask the cloud for up to 160.
    extra = daemon_extra(stack, "edge", max_tokens=160) + schemas + manuals
    d = daemon_factory(node_id=NODE, extra=extra)
    wait_link(d, True)
    return d


@pytest.fixture
def sniffer(stack: dict[str, Any]) -> Iterator[Sniffer]:
    s = Sniffer(stack["cloud"].port)
    time.sleep(0.3)  # subscribed before the test publishes
    yield s
    s.close()


def ask(conn: Conn, rid: str, prompt: str, **fields: Any) -> list[dict[str, Any]]:
    conn.send({"id": rid, "prompt": prompt, "max_tokens": 8, **fields})
    return conn.until_final(rid)


def assert_cloud_answer(events: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    done = events[-1]
    assert done["event"] == "done", events
    assert done["source"] == "cloud" and done["model"] == STAND_IN, done
    assert done["escalation"]["reason"] == reason and done["escalation"]["status"] == "answered"
    assert done["text"].strip()
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]
    return done


def test_explicit_flag_streams_the_cloud_answer(edge: Daemon, sniffer: Sniffer) -> None:
    marker = uuid.uuid4().hex[:8]
    with connect(edge.socket_path) as c:
        events = ask(c, "flag", f"Name one metal. ({marker})", escalate=True)
    done = assert_cloud_answer(events, "flag")
    asked = [json.loads(p) for t, p in sniffer.seen() if t == "edgeagent-cloud/ask"]
    mine = [a for a in asked if marker in json.dumps(a)]
    assert len(mine) == 1 and mine[0]["escalation_id"] == done["escalation"]["id"]
    assert mine[0]["node_id"] == NODE and mine[0]["reason"] == {"reason": "flag"}


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("What is the torque spec for an M8 bolt?", "keyword"),
        ("The press shows alarm E042. What now?", "pattern"),
        ("Summarise this shift log: " + "Line 3 ran normally, no stops. " * 20, "prompt_tokens"),
    ],
)
def test_each_rule_escalates(edge: Daemon, prompt: str, reason: str) -> None:
    with connect(edge.socket_path) as c:
        assert_cloud_answer(ask(c, reason, prompt), reason)


def test_plain_question_is_answered_locally(edge: Daemon) -> None:
    with connect(edge.socket_path) as c:
        done = ask(c, "plain", "What is a PLC?")[-1]
    assert done["source"] == "local" and "escalation" not in done


def test_deep_topic_escalates_over_mqtt(stack: dict[str, Any], edge: Daemon) -> None:
    r = Requester(stack["local"].port)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")
        question = {"id": "deep", "prompt": "Name a gas.", "max_tokens": 8}
        r.publish(f"edgeagent/{NODE}/ask/deep", question, correlation=b"c-deep",
                  response_topic=r.reply_topic)  # fmt: skip
        events = r.finals({"deep"})["deep"]
    finally:
        r.close()
    assert_cloud_answer(events, "topic")


def test_private_and_opt_out_never_leave_the_box(edge: Daemon, sniffer: Sniffer) -> None:
    marker = uuid.uuid4().hex[:8]
    with connect(edge.socket_path) as c:
        private = ask(c, "p1", f"torque spec of part {marker}?", escalate=True, private=True)
        opt_out = ask(c, "p2", f"torque spec of part {marker}?", escalate=False)
    for events in (private, opt_out):
        assert events[-1]["source"] == "local" and "escalation" not in events[-1]
    time.sleep(0.5)
    assert not [t for t, p in sniffer.seen() if marker.encode() in p]


def test_redacted_text_never_reaches_the_cloud_broker(edge: Daemon, sniffer: Sniffer) -> None:
    with connect(edge.socket_path) as c:
        done = assert_cloud_answer(
            ask(c, "red", "Unit SN-123456 rattles. Is that bad?", escalate=True), "flag"
        )
    seen = sniffer.seen()
    asked = [p for t, p in seen if t == "edgeagent-cloud/ask"]
    assert any(done["escalation"]["id"].encode() in p and b"Unit [serial] rattles" in p
               for p in asked)  # fmt: skip
    assert not [t for t, p in seen if b"123456" in p]


def test_escalation_over_http_streams_the_cloud_answer(edge: Daemon, sniffer: Sniffer) -> None:
    """An OpenAI client asks with edgeagent's `escalate`; the stream says where it came from."""
    marker = uuid.uuid4().hex[:8]
    sdk = openai.OpenAI(base_url=f"{edge.http_url}/v1", api_key="x", max_retries=0)
    chunks = list(sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"Name one metal. ({marker})"}],
        max_tokens=8, stream=True, extra_body={"escalate": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    end = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    extra = end.model_extra or {}
    assert end.model == STAND_IN and extra["source"] == "cloud", extra
    assert extra["escalation"]["reason"] == "flag" and extra["escalation"]["status"] == "answered"
    assert text.strip()
    asked = [json.loads(p) for t, p in sniffer.seen() if t == "edgeagent-cloud/ask"]
    assert [a["escalation_id"] for a in asked if marker in json.dumps(a)] == [
        extra["escalation"]["id"]
    ]


def test_a_late_cloud_answer_is_fetched_over_http(stack: dict[str, Any], edge: Daemon) -> None:
    server = stack["server"].proc
    sdk = openai.OpenAI(base_url=f"{edge.http_url}/v1", api_key="x", max_retries=0)
    server.send_signal(signal.SIGSTOP)  # the model server hangs
    try:
        reply = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
            extra_body={"escalate": True},
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGCONT)
    extra = reply.model_extra or {}
    assert extra["source"] == "local" and extra["escalation"]["status"] == "timeout", extra
    esc_id = extra["escalation"]["id"]
    deadline = time.monotonic() + 90
    while True:
        with urllib.request.urlopen(f"{edge.http_url}/v1/edgeagent/results/{esc_id}") as r:
            result = json.loads(r.read())
        if result["status"] != "queued" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result["status"] == "answered" and result["model"] == STAND_IN, result
    assert result["request_id"] == reply.id and result["text"].strip()
    with urllib.request.urlopen(f"{edge.http_url}/v1/edgeagent/results/{reply.id}") as r:
        assert json.loads(r.read())["text"] == result["text"]


def test_cloud_timeout_answers_locally_then_follows_up(stack: dict[str, Any], edge: Daemon) -> None:
    server = stack["server"].proc
    server.send_signal(signal.SIGSTOP)  # the model server hangs
    try:
        with connect(edge.socket_path) as c:
            c.send({"id": "slow", "prompt": "Name a colour.", "max_tokens": 8, "escalate": True})
            done = c.until_final("slow")[-1]
            assert done["event"] == "done" and done["source"] == "local", done
            assert done["escalation"]["status"] == "timeout"
            server.send_signal(signal.SIGCONT)
            while True:  # the late cloud answer comes to the connection that is still open
                event = c.read()
                if event["event"] == "cloud_answer":
                    break
    finally:
        server.send_signal(signal.SIGCONT)
    assert event["id"] == "slow" and event["escalation_id"] == done["escalation"]["id"]
    assert event["status"] == "answered" and event["model"] == STAND_IN and event["text"].strip()


def test_offline_queue_then_cloud_answer_over_mqtt(stack: dict[str, Any], edge: Daemon) -> None:
    cloud: Broker = stack["cloud"]
    r = Requester(stack["local"].port)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")
        cloud.stop()
        wait_link(edge, False)
        r.publish(f"edgeagent/{NODE}/ask", {"id": "off", "prompt": "Name a tool.",
                  "max_tokens": 8, "escalate": True}, correlation=b"corr-off",
                  response_topic=r.reply_topic)  # fmt: skip
        done = r.finals({"off"})["off"][-1]
        assert done["source"] == "local" and done["escalation"]["status"] == "queued", done
        esc_id = done["escalation"]["id"]

        def result(key: str) -> dict[str, Any]:  # asked by the requester: its own result
            r.publish(f"edgeagent/{NODE}/ask", {"op": "result", "id": key},
                      response_topic=r.reply_topic, correlation=b"op")  # fmt: skip
            reply, _ = r.next()
            assert reply["event"] == "result", reply
            return reply

        assert result(esc_id)["status"] == "queued"
        cloud.start()
        event, corr = r.next(timeout=90)
        assert event["event"] == "cloud_answer" and corr == b"corr-off", event
        assert event["id"] == "off" and event["escalation_id"] == esc_id
        assert event["status"] == "answered" and event["text"].strip()
        answered = result("off")
        assert answered["status"] == "answered" and answered["text"] == event["text"]
        assert r.drain(2) == []  # answered once
    finally:
        r.close()
        if cloud.proc is None or cloud.proc.poll() is not None:
            cloud.start()


def test_spooled_escalations_survive_kill_9_and_are_answered_once(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    cloud: Broker = stack["cloud"]
    d = daemon_factory(node_id="esc-crash", extra=daemon_extra(stack, "crash"))
    wait_link(d, True)
    r = Requester(stack["local"].port)
    ids = {f"k{i}" for i in range(3)}
    try:
        r.wait_online("edgeagent/esc-crash/status")
        cloud.stop()
        wait_link(d, False)
        for rid in sorted(ids):
            r.publish("edgeagent/esc-crash/ask", {"id": rid, "prompt": f"Name metal number {rid}.",
                      "max_tokens": 8, "escalate": True}, response_topic=r.reply_topic)  # fmt: skip
        finals = r.finals(ids)
        assert all(f[-1]["escalation"]["status"] == "queued" for f in finals.values()), finals
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        cloud.start()
        d.start()
        answers: dict[str, list[dict[str, Any]]] = {rid: [] for rid in ids}
        deadline = time.monotonic() + 120
        while any(not a for a in answers.values()):
            event, _ = r.next(timeout=max(0.1, deadline - time.monotonic()))
            if event["event"] == "cloud_answer":
                answers[event["id"]].append(event)
        for event in r.drain(3):
            if event["event"] == "cloud_answer":
                answers[event["id"]].append(event)
    finally:
        r.close()
        if cloud.proc is None or cloud.proc.poll() is not None:
            cloud.start()
    for rid, got in answers.items():
        assert len(got) == 1, (rid, got)
        assert got[0]["status"] == "answered" and got[0]["text"].strip()
        assert got[0]["escalation_id"] == finals[rid][-1]["escalation"]["id"]


def test_spool_bounds_drop_the_oldest_and_say_so(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    # The cloud broker of this daemon never answers: a port nothing listens on.
    d = daemon_factory(
        node_id="esc-bounds",
        extra=daemon_extra(stack, "bounds", cloud_port=free_port(), spool_max=2, offline="queue"),
    )
    with connect(d.socket_path) as c:
        finals, dropped = {}, []
        for i in range(4):
            c.send({"id": f"b{i}", "prompt": f"Question {i}?", "escalate": True})
            while f"b{i}" not in finals:
                event = c.read()
                if event["event"] == "done":
                    finals[event["id"]] = event
                elif event["event"] == "cloud_answer":
                    dropped.append(event)
        for done in finals.values():
            assert done["source"] == "queued" and done["text"] == ""
            assert done["escalation"]["status"] == "queued"
        while len(dropped) < 2:  # the open connection hears of the two dropped ones
            event = c.read()
            if event["event"] == "cloud_answer":
                dropped.append(event)
        assert [e["id"] for e in dropped] == ["b0", "b1"]
        assert all(e["status"] == "dropped" and e["error"]["code"] == "dropped" for e in dropped)
        status = c.op("status")["escalation"]
        assert status["spool"]["waiting"] == 2 and status["spool"]["dropped_total"] == 2
        assert c.op("result", id="b0")["status"] == "dropped"
        assert c.op("result", id="b3")["status"] == "queued"


def test_model_server_error_falls_back_to_the_local_answer(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    """A worker whose model server is down answers `cloud_error`; the edge answers locally."""
    broken = f'base_url = "http://127.0.0.1:{free_port()}/v1"\n'
    with worker_and_edge(stack, daemon_factory, "broken", broken) as d, connect(d.socket_path) as c:
        done = ask(c, "err", "Name a metal.", escalate=True)[-1]
        assert done["event"] == "done" and done["source"] == "local", done
        assert done["escalation"]["status"] == "cloud_error"
        assert "model server failed" in done["escalation"]["message"]
        assert c.op("result", id="err")["status"] == "failed"


def test_unsure_local_answer_gets_a_cloud_second_opinion(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    # A mean log-probability is below 0 for any real answer: every answer counts as unsure
    # here, except for requests that may not leave the box.
    d = daemon_factory(
        node_id="esc-unsure",
        extra=daemon_extra(stack, "unsure", low_confidence=True, min_mean_logprob=0.0),
    )
    wait_link(d, True)
    with connect(d.socket_path) as c:
        local = ask(c, "u1", "Name a planet.")
        done = local[-1]
        assert done["source"] == "local" and done["text"].strip(), done
        assert done["confidence"]["mean_logprob"] < 0
        assert done["escalation"]["reason"] == "low_confidence"
        assert done["escalation"]["status"] == "queued"
        while True:
            event = c.read()
            if event["event"] == "cloud_answer":
                break
        assert event["id"] == "u1" and event["escalation_id"] == done["escalation"]["id"]
        assert event["status"] == "answered" and event["model"] == STAND_IN
        assert event["escalation"]["reason"] == "low_confidence"
        kept = ask(c, "u2", "Name a planet.", private=True)[-1]
        assert kept["source"] == "local" and "escalation" not in kept


def test_sigterm_stops_cleanly_with_the_spool_open(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(node_id="esc-stop", extra=daemon_extra(stack, "stop"))
    wait_link(d, True)
    with connect(d.socket_path) as c:
        assert_cloud_answer(ask(c, "s1", "Name a metal.", escalate=True), "flag")
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


class ScriptedWorker:
    """A test-owned stand-in for a cloud worker on the cloud broker: it says it is online and
    takes every ask; what it answers is the subclass's `_on_message`."""

    name = "scripted"

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def status_topic(self) -> str:
        return f"edgeagent-cloud/worker/{self.name}/status"

    def _on_connect(self, c: mqtt.Client, *_: Any) -> None:
        c.subscribe("edgeagent-cloud/ask", 1)
        c.publish(self.status_topic, json.dumps({"state": "online"}), 1, retain=True)

    def _on_message(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.client.publish(self.status_topic, b"", 1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()


class ForgetfulWorker(ScriptedWorker):
    """A cloud worker whose first answer to each escalation never reaches the edge (as when it
    is published while the edge resubscribes to a broker that restarted). It answers an
    escalation id only when that id is asked a second time."""

    name = "forgetful"

    def __init__(self, port: int) -> None:
        self.asks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: dict[str, int] = {}
        super().__init__(port)

    def _on_message(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ask = json.loads(msg.payload)
        esc_id = ask["escalation_id"]
        self.seen[esc_id] = self.seen.get(esc_id, 0) + 1
        self.asks.put(ask)
        if self.seen[esc_id] == 2:
            props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = msg.properties.CorrelationData
            answer = {"event": "done", "escalation_id": esc_id, "text": "Asked twice: steel.",
                      "model": "forgetful", "finish_reason": "stop"}  # fmt: skip
            c.publish(msg.properties.ResponseTopic, json.dumps(answer), 1, properties=props)


def test_unanswered_escalation_is_asked_again_on_a_link_that_stayed_up(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    cloud = Broker(tmp_path_factory.mktemp("forgetful-broker")).start()
    worker = ForgetfulWorker(cloud.port)
    try:
        d = daemon_factory(
            node_id="esc-resend",
            extra=daemon_extra(stack, "resend", cloud_port=cloud.port, resend_s=2.0, timeout_s=1.0),
        )
        wait_link(d, True)
        with connect(d.socket_path) as c:
            c.send({"id": "again", "prompt": "Name a metal.", "max_tokens": 8, "escalate": True})
            seen = c.until_final("again")
            done = seen[-1]
            assert done["source"] == "local" and done["escalation"]["status"] == "timeout", done
            # The answer to the second ask comes to the connection still open (on a slow box
            # even before the local answer is done).
            early = [e for e in seen if e["event"] == "cloud_answer"]
            event = early[0] if early else c.read()
            while event["event"] != "cloud_answer":
                event = c.read()
            time.sleep(3)  # a second answer would come now: the worker has none to give
            c.send({"op": "status"})
            extra = []
            while (late := c.read())["event"] != "status":
                extra.append(late)
            status = late["escalation"]
    finally:
        worker.close()
        cloud.stop()
    esc_id = done["escalation"]["id"]
    assert worker.seen == {esc_id: 2}, worker.seen
    assert event["escalation_id"] == esc_id and event["text"] == "Asked twice: steel."
    assert extra == [], extra
    assert status["resent"] == 1 and status["link"].get("disconnects", 0) == 0, status


def test_full_local_queue_gives_the_queued_answer_when_the_escalation_is_stored(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    """offline = local+queue, cloud down, local queue full: the question is already on disk,
    so the requester hears `queued` (and later the cloud), not `busy`."""
    d = daemon_factory(
        node_id="esc-full",
        queue_size=1,
        engine_extra="parallel = 1",
        extra=daemon_extra(stack, "full", cloud_port=free_port()),  # no cloud: link stays down
    )
    long = {"prompt": "Count from 1 to 400, one number per line.", "max_tokens": 200}
    with connect(d.socket_path) as a, connect(d.socket_path) as b, connect(d.socket_path) as c:
        a.send({"id": "runs", **long})
        assert a.read()["event"] == "token"  # the one slot is taken
        b.send({"id": "waits", **long})
        deadline = time.monotonic() + 30
        while c.op("status")["queue_depth"] < 1:  # the one queue place is taken
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.send({"id": "esc", "prompt": "Name a metal.", "max_tokens": 8, "escalate": True})
        final = c.until_final("esc")[-1]
        result = c.op("result", id="esc")
        for conn, rid in ((a, "runs"), (b, "waits")):
            conn.send({"op": "cancel", "id": rid})
            assert conn.until_final(rid)[-1]["event"] in ("done", "error")
    assert final["event"] == "done" and final["source"] == "queued", final
    assert final["escalation"]["status"] == "queued" and final["escalation"]["local"] == "busy"
    assert result["status"] == "queued" and result["escalation_id"] == final["escalation"]["id"]


def test_an_escalated_schema_request_gets_the_clouds_answer_in_that_shape(
    edge: Daemon, sniffer: Sniffer
) -> None:
    """The schema goes to the worker, which passes it to the model server as response_format;
    the cloud's answer is checked at the edge and carries its value as `json`."""
    with connect(edge.socket_path) as c:
        events = ask(c, "cs1", "Press 4 stopped: hydraulic pressure low. Classify it.",
                     escalate=True, format=ALARM, max_tokens=120)  # fmt: skip
        done = assert_cloud_answer(events, "flag")
        assert_alarm(done["json"])
        assert json.loads(done["text"]) == done["json"]
        result = c.op("result", id="cs1")
    assert result["status"] == "answered" and result["json"] == done["json"], result
    asked = [json.loads(p) for t, p in sniffer.seen() if t == "edgeagent-cloud/ask"]
    mine = [a for a in asked if a["escalation_id"] == done["escalation"]["id"]]
    assert len(mine) == 1 and mine[0]["format"] == ALARM


def test_an_escalated_response_format_over_http_is_checked_at_the_edge(edge: Daemon) -> None:
    sdk = openai.OpenAI(base_url=f"{edge.http_url}/v1", api_key="x", max_retries=0)
    answer = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Conveyor 2 tripped on overload."}],
        max_tokens=120, extra_body={"escalate": True},
        response_format={"type": "json_schema",
                         "json_schema": {"name": "alarm", "schema": ALARM, "strict": True}},
    )  # fmt: skip
    extra = answer.model_extra or {}
    assert answer.model == STAND_IN and extra["source"] == "cloud", extra
    assert_alarm(json.loads(answer.choices[0].message.content or ""))


def test_a_grammar_never_leaves_the_box(edge: Daemon) -> None:
    with connect(edge.socket_path) as c:
        refused = ask(c, "g1", "Is E042 serious?", grammar='root ::= "yes" | "no"', escalate=True)
    assert refused[-1]["code"] == "bad_request" and "grammar" in refused[-1]["message"]


def test_plain_text_on_a_schema_topic_gets_a_structured_answer(
    stack: dict[str, Any], edge: Daemon
) -> None:
    """A PLC gateway over MQTT 3.1.1 (no Response Topic) publishes the alarm text as it is on
    ask/alarm and reads one `done` with `json` on answer/alarm: locally, and from the cloud
    when a rule escalates it (the pattern rule matches E042)."""
    r = Requester(stack["local"].port, v5=False)
    answers = f"edgeagent/{NODE}/answer/alarm"
    try:
        r.client.subscribe(answers, 1)
        r.wait_online(f"edgeagent/{NODE}/status")
        for text, source in (("Filler 3: low air pressure at the capper.", "local"),
                             ("Press 4 shows E042: hydraulic pressure low.", "cloud")):  # fmt: skip
            r.publish(f"edgeagent/{NODE}/ask/alarm", text.encode())
            event, _ = r.next(topic=answers, timeout=120)
            assert event["event"] == "done" and event["source"] == source, event
            assert event["question"] == text  # how a gateway matches answers to questions
            assert_alarm(event["json"])
        r.publish(f"edgeagent/{NODE}/ask/alarm", b"\xff\xfe")
        event, _ = r.next(topic=answers)
        assert event["event"] == "error" and event["code"] == "bad_request", event
        # A JSON request there gets the topic's schema as its default `format`, and keeps
        # its own reply topic.
        r.publish(
            f"edgeagent/{NODE}/ask/alarm",
            {"id": "j1", "reply_to": r.reply_topic, "prompt": "Capper torque alarm on line 2."},
        )
        final = r.finals({"j1"})["j1"][-1]
        assert final["event"] == "done" and final["source"] == "local", final
        assert_alarm(final["json"])
    finally:
        r.close()


def test_a_cloud_answer_outside_the_schema_falls_back_to_the_local_one(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    """A model server that is not told the schema (response_format = "off") answers in prose:
    the edge refuses it as `invalid` and the local model's constrained answer stands in."""
    loose = (f'base_url = "{stack["server_url"]}"\nmodel = "{STAND_IN}"\n'
             'response_format = "off"\ntoken_interval_ms = 0\n')  # fmt: skip
    with worker_and_edge(stack, daemon_factory, "loose", loose) as d, connect(d.socket_path) as c:
        events = ask(c, "inv", "Name one metal.", escalate=True, format=ALARM, max_tokens=100)
        done = events[-1]
        assert done["event"] == "done" and done["source"] == "local", done
        assert done["escalation"]["status"] == "invalid", done
        assert "shape" in done["escalation"]["message"]
        assert_alarm(done["json"])
        tokens = [e for e in events if e["event"] in ("token", "restart")]
        after_restart = tokens[max((i + 1 for i, e in enumerate(tokens)
                                    if e["event"] == "restart"), default=0):]  # fmt: skip
        assert "".join(e["text"] for e in after_restart) == done["text"]
        result = c.op("result", id="inv")
        assert result["status"] == "failed" and result["error"]["code"] == "invalid", result
        assert result["error"]["text"].strip() and not result["error"]["text"].startswith("{")


def test_private_passages_never_reach_the_cloud(edge: Daemon, sniffer: Sniffer) -> None:
    """A grounded question escalated, and a grounded question answered here whose session's
    next question is escalated: the passage of the private collection never reaches the
    cloud broker, neither with the question nor in the session's history (the session keeps
    the question as asked, and a turn that read a private passage is private); the shared
    passage goes with its number."""
    question = "What temperature for the press P4 hydraulic oil?"
    with connect(edge.socket_path) as c:
        first = ask(c, "kb1", question, kb=True, escalate=True, max_tokens=16)
        cites = first[0]["citations"]
        assert first[0]["event"] == "citations" and first[-1]["event"] == "done", first
        assert {c["doc"] for c in cites} == {"Press P4 manual", "Press P4 recipe sheet"}
        local = ask(c, "kb2", question, kb=True, session="kb-s", max_tokens=16)
        assert local[-1]["source"] == "local", local[-1]
        follow = ask(c, "kb3", "And what happens above that?", escalate=True, session="kb-s")
        assert follow[-1]["event"] == "done", follow
    # The cloud answered with the passages it was given, under the numbers the terminal shows.
    assert first[-1]["source"] == "cloud" and first[-1]["citations"] == cites, first[-1]
    seen = [p for t, p in sniffer.seen() if t == "edgeagent-cloud/ask"]
    mine = [json.loads(p) for p in seen if b"hydraulic oil" in p or b"above that" in p]
    assert len(mine) == 2, seen
    assert all(b"ZX-SECRET-7731" not in p and b"58 C" not in p for p in seen)
    shared = next(c["n"] for c in cites if c["doc"] == "Press P4 manual")
    assert f"[{shared}] Press P4 manual" in json.dumps(mine[0]["messages"])


def test_a_kb_topic_answers_plain_text_from_its_collections(
    stack: dict[str, Any], edge: Daemon
) -> None:
    """[mqtt.kb] "ask/manuals" = ["line-4"]: an HMI gateway over MQTT 3.1.1 publishes the
    operator's question as plain text and reads, on answer/manuals, the passages of line 4's
    manuals first and then the answer, which carries them and the question."""
    r = Requester(stack["local"].port, v5=False)
    answers = f"edgeagent/{NODE}/answer/manuals"
    question = "What temperature for the press P4 hydraulic oil?"
    try:
        r.client.subscribe(answers, 1)
        r.wait_online(f"edgeagent/{NODE}/status")
        r.publish(f"edgeagent/{NODE}/ask/manuals", question.encode())
        first, _ = r.next(topic=answers, timeout=120)
        assert first["event"] == "citations", first
        # Only line 4's manual: the private recipe sheet is another collection.
        assert [c["doc"] for c in first["citations"]] == ["Press P4 manual"], first
        done, _ = r.next(topic=answers, timeout=120)
        assert done["event"] == "done" and done["source"] == "local", done
        assert done["citations"] == first["citations"] and done["question"] == question
        assert done["id"] == first["id"]
        # A JSON request there may still say otherwise.
        r.publish(f"edgeagent/{NODE}/ask/manuals",
                  {"id": "m2", "reply_to": r.reply_topic, "prompt": question, "kb": False,
                   "max_tokens": 4})  # fmt: skip
        plain = r.finals({"m2"})["m2"]
        assert [e["event"] for e in plain if e["event"] != "token"] == ["done"], plain
        assert "citations" not in plain[-1]
    finally:
        r.close()
