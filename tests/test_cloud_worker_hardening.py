"""The cloud worker against hostile askers and a misbehaving model server: a real mosquitto, the
real `edgeagent cloud-worker` process, and a small OpenAI-compatible streaming server written
here (on loopback) that can be told, by the question it gets, to redirect, drip bytes without a
newline, stream without end, or send lines the worker must refuse."""

from __future__ import annotations

import contextlib
import http.server
import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import Process
from tests.mqtt_helpers import Broker
from tests.reliability import record

PREFIX = "hard-cloud"
WORKER = "w-hard"
MODEL = "fake-model"
API_KEY = "sk-test-" + uuid.uuid4().hex
TIMEOUT_S = 3  # the worker's request_timeout_s
MAX_ANSWER = 1024  # the worker's max_answer_bytes (the smallest allowed)
WAIT_S = 30  # how long a test waits for anything the worker should publish
UNIT = "aé€😀"  # 1 + 2 + 3 + 4 UTF-8 bytes: a cut at MAX_ANSWER falls inside a character
HUGE_CHUNKS = 20_000  # what an endless answer streams at most, so the test ends either way
LONG_LINE = 2 << 20  # longer than the worker's longest event line
STATUS_TOPIC = f"{PREFIX}/worker/{WORKER}/status"


def reply_topic(node: str) -> str:
    return f"{PREFIX}/reply/{node}"


# --- the model server -----------------------------------------------------------------------


class ModelServer(http.server.ThreadingHTTPServer):
    """OpenAI's streaming chat completions on loopback. The last user message picks the
    behaviour: a word of BEHAVIOURS in it, else an echo of it. Every request is recorded."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ModelHandler)
        self.stop = threading.Event()
        self.requests: list[dict[str, Any]] = []  # {method, path, authorization, content}
        self.redirect_to = ""
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


def chunk_line(content: Optional[str], finish: Optional[str] = None) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": {} if content is None else {"content": content},
                          "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class ModelHandler(http.server.BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    chunked = True

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:  # a followed 302 turns the POST into a GET
        self._answer("")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(body["messages"][-1]["content"])

    def _answer(self, content: str) -> None:
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "authorization": self.headers.get("Authorization"),
                                     "content": content})  # fmt: skip
        try:
            for word, behaviour in BEHAVIOURS.items():
                if word in content:
                    behaviour(self)
                    return
            self._start()
            time.sleep(1.5 if "SLOW" in content else 0)
            for part in ("echo: ", content):
                self._send(chunk_line(part))
            self._send(chunk_line(None, "stop") + b"data: [DONE]\n\n")
            self._end()
        except OSError:  # the worker hung up: what a misbehaving answer expects
            pass

    def _start(self, chunked: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunked = chunked

    def _send(self, data: bytes) -> None:
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    def _end(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _hold(self) -> None:
        self.server.stop.wait(60)

    def redirect(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.redirect_to)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def drip(self, chunked: bool) -> None:
        """A byte every 0.1 s, never a newline: each byte resets the worker's socket timeout."""
        self._start(chunked)
        self._send(b"data: ")
        while not self.server.stop.wait(0.1):
            self._send(b"x")

    def endless(self) -> None:
        self._start()
        for _ in range(HUGE_CHUNKS):
            self._send(chunk_line(UNIT))
        self._send(chunk_line(None, "stop") + b"data: [DONE]\n\n")
        self._end()

    def long_line(self) -> None:
        self._start()
        self._send(b'data: {"choices": [{"delta": {"content": "' + b"x" * LONG_LINE)
        self._hold()

    def not_text(self) -> None:
        self._start()
        self._send(b'data: {"choices": [{"delta": {"content": 42}}]}\n\n')
        self._hold()


BEHAVIOURS = {
    "REDIRECT": ModelHandler.redirect,
    "DRIPCHUNKED": lambda h: h.drip(chunked=True),
    "DRIP": lambda h: h.drip(chunked=False),
    "ENDLESS": ModelHandler.endless,
    "LONGLINE": ModelHandler.long_line,
    "NOTTEXT": ModelHandler.not_text,
}


# --- the broker side ------------------------------------------------------------------------


class Box:
    """A real MQTT v5 client on the cloud broker that asks as any edge box may (any node id,
    any Response Topic) and records everything published there (it subscribes to `#`)."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[tuple[str, bytes, Optional[bytes], bool]] = queue.Queue()
        self.all: list[tuple[str, bytes, Optional[bytes], bool]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"box-{uuid.uuid4().hex[:8]}")  # fmt: skip
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe("#", 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        self.messages.put((msg.topic, bytes(msg.payload), corr, bool(msg.retain)))

    def ask(self, payload: Any, response_topic: Optional[str], esc_id: str = "") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        props.CorrelationData = (esc_id or "no-id").encode()
        self.client.publish(f"{PREFIX}/ask", data, 1, False, props).wait_for_publish(10)

    def escalate(self, node: str, esc_id: str, content: str) -> None:
        """What an edge daemon sends (escalation.py): its own reply topic and node id."""
        self.ask(escalation(node, esc_id, content), reply_topic(node), esc_id)

    def mark(self) -> int:
        """Where messages from now on start in `all`."""
        while not self.messages.empty():
            self.all.append(self.messages.get())
        return len(self.all)

    def final(self, topic: str, esc_id: str, timeout: float = WAIT_S,
              since: int = 0) -> list[dict[str, Any]]:  # fmt: skip
        """Every event for `esc_id` on `topic` (from message `since` on) up to its final one."""
        deadline = time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        i = since
        while True:
            while i < len(self.all):
                t, payload, _, _ = self.all[i]
                i += 1
                event = json.loads(payload) if t == topic else {}
                if event.get("escalation_id") == esc_id:
                    events.append(event)
                    if event["event"] in ("done", "error"):
                        return events
            left = deadline - time.monotonic()
            assert left > 0, f"no final for {esc_id} on {topic}: {events}"
            with contextlib.suppress(queue.Empty):
                self.all.append(self.messages.get(timeout=left))

    def everything(self, settle: float = 0.5) -> list[tuple[str, bytes, Optional[bytes], bool]]:
        """All messages so far, after `settle` seconds of quiet."""
        while True:
            try:
                self.all.append(self.messages.get(timeout=settle))
            except queue.Empty:
                return list(self.all)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def escalation(node: Optional[str], esc_id: str, content: str) -> dict[str, Any]:
    return {"escalation_id": esc_id, **({"node_id": node} if node is not None else {}),
            "messages": [{"role": "user", "content": content}], "max_tokens": 8}  # fmt: skip


def retained_status(port: int) -> dict[str, Any]:
    """The worker's retained status as a client connecting now reads it ({} when none)."""
    got: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *_: cl.subscribe(STATUS_TOPIC, 1)
    c.on_message = lambda _c, _u, m: got.put(bytes(m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        status: dict[str, Any] = json.loads(got.get(timeout=2))
        return status
    except queue.Empty:
        return {}
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Broker, model server, redirect target, and a worker with 2 threads, a 3 s deadline and
    answers of at most 1 KiB."""
    work = tmp_path_factory.mktemp("hardening")
    broker = Broker(tmp_path_factory.mktemp("hardening-broker")).start()
    server, target = ModelServer(), ModelServer()
    server.redirect_to = f"{target.url}/chat/completions"
    key_file = work / "cloud-api-key"
    key_file.write_text(API_KEY + "\n")
    cfg = work / "worker.toml"
    cfg.write_text(
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nkeepalive = 2\n'
        f'reconnect_min_s = 1\nreconnect_max_s = 1\ntopic_prefix = "{PREFIX}"\n'
        f'[worker]\nworker_id = "{WORKER}"\nbase_url = "{server.url}"\nmodel = "{MODEL}"\n'
        f"concurrency = 2\ntoken_interval_ms = 0\nrequest_timeout_s = {TIMEOUT_S}\n"
        f'max_answer_bytes = {MAX_ANSWER}\napi_key_file = "{key_file}"\n'
    )
    worker = Process(
        [sys.executable, "-m", "edgeagent", "cloud-worker", "--config", str(cfg)],
        work / "worker.log",
    ).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while retained_status(broker.port).get("state") != "online":
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)
        yield {"broker": broker, "server": server, "target": target, "worker": worker}
    finally:
        worker.stop()
        server.close()
        target.close()
        broker.stop()


@pytest.fixture
def box(stack: dict[str, Any]) -> Iterator[Box]:
    b = Box(stack["broker"].port)
    yield b
    b.close()


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def assert_echo(events: list[dict[str, Any]], content: str) -> dict[str, Any]:
    done = events[-1]
    assert done["event"] == "done" and done["text"] == f"echo: {content}", events
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]
    return done


# --- the tests ------------------------------------------------------------------------------


def test_reply_goes_only_to_the_asking_nodes_reply_topic(stack: dict[str, Any], box: Box) -> None:
    """Escalations whose Response Topic is not `<prefix>/reply/<their node_id>` get nothing
    published anywhere, are acknowledged (the worker takes 2 at a time, and the question after
    8 refused ones is answered), counted and logged in short; the worker stays online."""
    long_topic = f"{PREFIX}/worker/" + "x" * 5000
    cases: list[tuple[str, Any, Optional[str]]] = [
        ("worker status", "box-1", STATUS_TOPIC),
        ("another node's reply topic", "box-1", reply_topic("box-2")),
        ("no node_id", None, reply_topic("box-1")),
        ("node_id that is not a node id", "box-1/x", reply_topic("box-1/x")),
        ("outside the prefix", "box-1", "elsewhere/reply/box-1"),
        ("5000-character topic", "box-1", long_topic),
        ("no Response Topic", "box-1", None),
        ("malformed, to a worker status", b"{not json", STATUS_TOPIC),
    ]
    # A malformed escalation to a valid reply topic is not answered either: its escalation id
    # could only come from the Correlation Data, and an error there would fail whichever of
    # box-1's escalations the sender named.
    cases.append(("malformed, to a node's reply topic", b"{not json", reply_topic("box-1")))
    refused = {}
    for label, node, topic in cases:
        esc_id = new_id("refused")
        refused[esc_id] = label
        payload = node if isinstance(node, bytes) else escalation(node, esc_id, f"hi {esc_id}")
        box.ask(payload, topic, esc_id)
    good_id = new_id("good")
    box.escalate("box-1", good_id, "after the refused ones")

    good = box.final(reply_topic("box-1"), good_id)
    seen = box.everything()
    assert_echo(good, "after the refused ones")
    published = [(t, p, r) for t, p, _, r in seen if t != f"{PREFIX}/ask"]
    # The worker's own retained status (online) is all there is besides box-1's one answer.
    assert all(t == reply_topic("box-1") or (t == STATUS_TOPIC and r) for t, _, r in published), [
        (t[:80], p[:80]) for t, p, _ in published
    ]
    assert not [p for t, p, _ in published if any(i.encode() in p for i in refused)], published
    assert all(json.loads(p)["state"] == "online" for t, p, _ in published if t == STATUS_TOPIC)
    assert retained_status(stack["broker"].port)["state"] == "online"
    log = stack["worker"].log()
    lines = [line for line in log.splitlines() if "refused an escalation" in line]
    assert len(lines) == len(cases), log[-3000:]
    assert f"refused an escalation ({len(cases)} so far)" in log
    assert all(len(line) < 400 for line in lines) and "x" * 200 not in log, lines
    record(
        "cloud worker: escalation naming a Response Topic that is not its node's",
        category="security",
        load=f"{len(cases)} refused escalations (2 malformed), 1 valid, one box",
        faults="Response Topic = a worker's status topic, another node's reply topic, a topic "
        "outside the prefix, 5000 characters, none; node_id missing or not a node id; "
        "malformed JSON with a forged Correlation Data",
        inputs="MQTT v5 escalations published straight to the cloud broker",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={
            "refused": len(cases),
            "published_to_refused_topics": 0,
            "worker_status_after": "online",
        },
    )


def test_answers_are_kept_per_node(stack: dict[str, Any], box: Box) -> None:
    """A box reusing another node's escalation id gets its own answer: not the other's cached
    one, nor the other's running one; and it plants nothing in the other's cache."""
    done_id = new_id("shared")
    secret = f"secret of box-a {uuid.uuid4().hex[:8]}"
    box.escalate("box-a", done_id, secret)
    first = assert_echo(box.final(reply_topic("box-a"), done_id), secret)
    box.escalate("box-b", done_id, "box-b asks")  # after box-a's answer is cached
    assert_echo(box.final(reply_topic("box-b"), done_id), "box-b asks")
    since = box.mark()
    box.escalate("box-a", done_id, secret)  # box-a asking again: its own answer, replayed
    replayed = box.final(reply_topic("box-a"), done_id, since=since)
    assert replayed == [first], replayed  # the very event, timings and all: not a new answer

    running_id = new_id("running")
    box.escalate("box-a", running_id, f"SLOW {secret}")
    time.sleep(0.3)  # box-a's escalation is running (the model server waits 1.5 s)
    box.escalate("box-b", running_id, "box-b asks meanwhile")
    assert_echo(box.final(reply_topic("box-b"), running_id), "box-b asks meanwhile")
    assert_echo(box.final(reply_topic("box-a"), running_id), f"SLOW {secret}")
    seen = box.everything()
    to_b = [p for t, p, _, _ in seen if t == reply_topic("box-b")]
    assert to_b and not [p for p in to_b if secret.encode() in p], to_b
    record(
        "cloud worker: another node's escalation id",
        category="security",
        load="2 boxes, 2 escalation ids each asked by both (one after it was answered, one "
        "while it ran)",
        faults="box-b reuses box-a's escalation ids to read or plant an answer",
        inputs="MQTT v5 escalations with each box's own reply topic",
        accepted=5,
        answered=5,
        lost=0,
        duplicated=0,
        figures={"box_a_secret_sent_to_box_b": 0, "box_a_replay_unchanged": True},
    )


def test_redirect_is_not_followed_and_the_api_key_stays_home(
    stack: dict[str, Any], box: Box
) -> None:
    server: ModelServer = stack["server"]
    target: ModelServer = stack["target"]
    esc_id = new_id("redirect")
    box.escalate("box-r", esc_id, f"REDIRECT {esc_id}")
    final = box.final(reply_topic("box-r"), esc_id)[-1]
    assert final["event"] == "error" and final["code"] == "cloud_error", final
    assert final["message"] == (
        f"model server redirected to {server.redirect_to!r}, not followed"
    ), final
    asked = [r for r in server.requests if esc_id in r["content"]]
    assert [r["authorization"] for r in asked] == [f"Bearer {API_KEY}"]  # the key is in use
    assert target.requests == [], target.requests  # and never reached the other host
    record(
        "cloud worker: model server redirects elsewhere",
        category="security",
        load="1 escalation",
        faults="the model server answers 302 to another host (which records Authorization)",
        inputs="worker with an API key file",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"requests_at_redirect_target": len(target.requests)},
    )


def test_dripping_model_server_is_cut_at_the_deadline(stack: dict[str, Any], box: Box) -> None:
    """Both worker threads on servers that send a byte every 0.1 s and never a newline (close-
    delimited and chunked): each ends in cloud_error, and the next question is answered."""
    ids = {new_id("drip"): "DRIP", new_id("dripchunked"): "DRIPCHUNKED"}
    t0 = time.monotonic()
    for esc_id, word in ids.items():
        box.escalate("box-d", esc_id, f"{word} {esc_id}")
    finals = {esc_id: box.final(reply_topic("box-d"), esc_id, 6 * TIMEOUT_S)[-1] for esc_id in ids}
    elapsed = time.monotonic() - t0
    for final in finals.values():
        assert final["event"] == "error" and final["code"] == "cloud_error", final
        assert final["message"] == (
            f"model server failed: no complete answer within {TIMEOUT_S} s"
        ), final
    after = new_id("after-drip")
    box.escalate("box-d", after, "still there?")
    assert_echo(box.final(reply_topic("box-d"), after), "still there?")
    record(
        "cloud worker: model server drips bytes without a newline",
        category="security",
        load="2 escalations (both worker threads), then 1 more",
        faults="the model server sends a byte every 0.1 s and never a newline "
        "(close-delimited and chunked bodies)",
        inputs=f"request_timeout_s = {TIMEOUT_S}",
        accepted=3,
        answered=3,
        lost=0,
        duplicated=0,
        figures={"both_cut_after_s": round(elapsed, 1)},
    )


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("LONGLINE", "model server failed: an event line longer than 1048576 bytes"),
        ("NOTTEXT", "model server failed: a stream chunk whose delta is not text"),
    ],
)
def test_malformed_stream_is_an_error_at_once(
    stack: dict[str, Any], box: Box, word: str, message: str
) -> None:
    """A 2 MiB line with no end in sight, or a delta that is not text, ends the answer with
    the reason (the server keeps the connection open: only the worker can end it)."""
    esc_id = new_id(word.lower())
    box.escalate("box-m", esc_id, f"{word} {esc_id}")
    final = box.final(reply_topic("box-m"), esc_id)[-1]
    assert final["event"] == "error" and final["code"] == "cloud_error", final
    assert final["message"] == message, final
    fault = {
        "LONGLINE": ("an endless line", "a 2 MiB event line, no newline, connection held open"),
        "NOTTEXT": ("a delta that is not text", '{"delta": {"content": 42}}, connection held'),
    }[word]
    record(
        f"cloud worker: model server sends {fault[0]}",
        category="security",
        load="1 escalation",
        faults=fault[1],
        inputs="streamed chat completion",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"message": final["message"]},
    )


def test_huge_answer_is_cut_at_max_answer_bytes(stack: dict[str, Any], box: Box) -> None:
    esc_id = new_id("endless")
    box.escalate("box-h", esc_id, f"ENDLESS {esc_id}")
    events = box.final(reply_topic("box-h"), esc_id)
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == "length", done
    expected = (UNIT * (MAX_ANSWER // len(UNIT))).encode()[:MAX_ANSWER].decode(errors="ignore")
    assert isinstance(done["text"], str) and done["text"] == expected
    assert MAX_ANSWER - 4 < len(done["text"].encode()) <= MAX_ANSWER
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]
    record(
        "cloud worker: model server streams without end",
        category="security",
        load="1 escalation",
        faults=f"the model server streams {HUGE_CHUNKS} chunks of 10 UTF-8 bytes",
        inputs=f"max_answer_bytes = {MAX_ANSWER}",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"answer_bytes": len(done["text"].encode()), "finish_reason": "length"},
    )


def test_escalation_as_the_edge_sends_it_is_answered(stack: dict[str, Any], box: Box) -> None:
    """The positive case the rules must keep: node id in the payload, `<prefix>/reply/<node>`
    as Response Topic, correlation data = escalation id (escalation.py CloudLink.publish_ask)."""
    esc_id = new_id("edge")
    box.escalate("edge.node_01-A", esc_id, "a node id with every allowed character")
    events = box.final(reply_topic("edge.node_01-A"), esc_id)
    assert events[0] == {"event": "start", "escalation_id": esc_id}
    done = assert_echo(events, "a node id with every allowed character")
    assert (
        done["model"] == MODEL and done["worker_id"] == WORKER and done["finish_reason"] == "stop"
    )
    corr = {c for t, p, c, _ in box.everything() if esc_id.encode() in p and t != f"{PREFIX}/ask"}
    assert corr == {esc_id.encode()}
