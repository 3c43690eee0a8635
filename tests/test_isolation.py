"""Trust boundaries, end to end: private data stays on the box, one client cannot see or disturb
another's sessions, results or cached prompts, and the daemon's own files are its own.

Real parts throughout: a daemon process, a local and a cloud mosquitto, the cloud worker and the
llama_cpp.server stand-in (the `stack` of test_escalation.py), a sniffer on the cloud broker to
see what leaves the box, and a second client that really is another user: a child process
running as uid/gid 65534, admitted by the socket's group, so the kernel's SO_PEERCRED tells the
daemon who it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import ROOT, Conn, Daemon, config_text, connect
from tests.mqtt_helpers import Broker, Requester, free_port
from tests.reliability import record
from tests.test_escalation import (  # noqa: F401 (a module fixture, used by name)
    NODE,
    ScriptedWorker,
    Sniffer,
    daemon_extra,
    stack,
    wait_link,
)
from tests.test_security import NOBODY, unprivileged_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")

CLOUD_ASK = "edgeagent-cloud/ask"
SYSTEM = "You are the assistant of press line 3. Answer in one short sentence, plainly."

# A terminal of another user: sends each step and reads until that step's reply.
CLIENT = r"""
import json, socket, sys
path, steps = sys.argv[1], json.loads(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(120)
s.connect(path)
buf, out = b"", []
for step in steps:
    s.sendall(json.dumps(step).encode() + b"\n")
    want = step.get("op")
    events = []
    while True:
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        event = json.loads(line)
        events.append(event)
        if event["event"] == "error" or (want and event["event"] == want) or (
            not want and event.get("id") == step["id"] and event["event"] == "done"
        ):
            break
    out.append(events)
print(json.dumps(out))
"""


def as_other_user(socket_path: str, steps: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Run `steps` over one connection as uid/gid 65534; each step's events."""
    res = subprocess.run(
        [unprivileged_python(), "-I", "-c", CLIENT, socket_path, json.dumps(steps)],
        user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: list[list[dict[str, Any]]] = json.loads(res.stdout)
    return out


def ask(conn: Conn, rid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    conn.send({"id": rid, "prompt": prompt, "max_tokens": 4, **fields})
    done = conn.until_final(rid)[-1]
    assert done["event"] == "done", done
    return done


def shared_dir() -> Path:
    """A directory uid 65534 may traverse; the socket's group and mode decide the rest."""
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-iso-"))
    os.chmod(workdir, 0o755)
    return workdir


@pytest.fixture(scope="module")
def edge(stack: dict[str, Any]) -> Iterator[Daemon]:  # noqa: F811
    """An edge daemon with MQTT, escalation and a system prompt, whose socket belongs to group
    nogroup (gid 65534): the other user gets in through the socket's group only."""
    workdir = shared_dir()
    base = config_text(node_id=NODE).replace(
        "[model]\n", f"[model]\nsystem_prompt = {json.dumps(SYSTEM)}\n", 1
    )
    text = base + 'group = "nogroup"\n' + daemon_extra(stack, "iso", timeout_s=20.0)
    d = Daemon(workdir, text).start()
    wait_link(d, True)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sniffer(stack: dict[str, Any]) -> Iterator[Sniffer]:  # noqa: F811
    s = Sniffer(stack["cloud"].port)
    time.sleep(0.3)
    yield s
    s.close()


def spool_payloads(stack: dict[str, Any]) -> list[str]:  # noqa: F811
    path = stack["work"] / "iso.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT payload FROM escalations")]


def test_the_socket_belongs_to_the_clients_group(edge: Daemon) -> None:
    st = os.lstat(edge.socket_path)
    assert st.st_gid == 65534 and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    steps = [{"op": "status"}]
    assert as_other_user(edge.socket_path, steps)[0][-1]["event"] == "status"


def test_a_private_turn_never_leaves_the_box(
    stack: dict[str, Any],  # noqa: F811
    edge: Daemon,
    sniffer: Sniffer,
) -> None:
    secret = f"KX9-{uuid.uuid4().hex[:8]}"
    session = f"shift-{uuid.uuid4().hex[:6]}"
    with connect(edge.socket_path) as c:
        kept = ask(c, "p1", f"Remember badge {secret} for me.", session=session, private=True)
        assert kept["source"] == "local" and "escalation" not in kept
        # The next turn of the same session goes to the cloud: without the private turn.
        up = ask(c, "p2", "Summarise what we said.", session=session, escalate=True)
        assert up["escalation"]["reason"] == "flag" and up["escalation"]["status"] == "answered"
        # The private turn is still part of the conversation on the box.
        local = ask(c, "p3", "And now?", session=session)
        fresh = ask(c, "p4", "And now?", session=f"{session}-new")
    assert local["usage"]["prompt_tokens"] > fresh["usage"]["prompt_tokens"] + 10, (local, fresh)
    time.sleep(0.5)
    seen = sniffer.seen()
    asked = [json.loads(p) for t, p in seen if t == CLOUD_ASK]
    mine = [a for a in asked if a["escalation_id"] == up["escalation"]["id"]]
    assert len(mine) == 1, asked
    contents = [m["content"] for m in mine[0]["messages"]]
    assert contents[-1] == "Summarise what we said." and SYSTEM in contents, contents
    assert not [t for t, p in seen if secret.encode() in p]  # nowhere on the cloud broker
    # A resend takes its payload from the spool: the secret is not there either, nor in logs.
    assert not [p for p in spool_payloads(stack) if secret in p]
    assert secret not in edge.log()
    record(
        "isolation: private turn, then an escalated turn of the same session",
        category="security",
        load="4 requests in one session and a fresh one",
        faults="a private turn followed by escalate=true in the same session",
        inputs="sniffer on the cloud broker, the spool file and the daemon log searched",
        accepted=4,
        answered=4,
        lost=0,
        duplicated=0,
        figures={"cloud_messages_sent": len(contents), "secret_seen_on_cloud": 0},
    )


def test_a_second_opinion_leaves_the_private_turns_out(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
    sniffer: Sniffer,
) -> None:
    # Every answer counts as unsure (a mean log-probability is below 0): each non-private
    # answer is asked of the cloud again, with the session's history.
    d = daemon_factory(
        node_id="iso-unsure",
        extra=daemon_extra(stack, "iso-unsure", low_confidence=True, min_mean_logprob=0.0),
    )
    try:
        wait_link(d, True)
        secret = f"PIN-{uuid.uuid4().hex[:8]}"
        with connect(d.socket_path) as c:
            first = ask(c, "o1", f"My locker pin is {secret}.", session="s", private=True)
            assert "escalation" not in first
            second = ask(c, "o2", "Which locker rows exist?", session="s")
            assert second["escalation"]["reason"] == "low_confidence", second
            while c.read()["event"] != "cloud_answer":
                pass
        seen = sniffer.seen()
        asked = [json.loads(p) for t, p in seen if t == CLOUD_ASK]
        mine = [a for a in asked if a["escalation_id"] == second["escalation"]["id"]]
        assert mine and "Which locker rows exist?" in json.dumps(mine[0])
        assert not [t for t, p in seen if secret.encode() in p]
    finally:
        d.stop()


def test_sessions_are_per_client(edge: Daemon) -> None:
    session = f"line-{uuid.uuid4().hex[:6]}"
    question = "Which step comes next?"
    with connect(edge.socket_path) as c:
        ask(c, "s1", "The jam at station 4 is cleared; the guard is closed.", session=session)
        mine = ask(c, "s2", question, session=session)
    other = as_other_user(
        edge.socket_path,
        [
            {"op": "reset", "session": session},  # someone else's: not found, nothing reset
            {"id": "o1", "prompt": question, "max_tokens": 4, "session": session},
            {"id": "o2", "prompt": question, "max_tokens": 4, "session": f"{session}-x"},
        ],
    )
    reset, same_name, fresh = (steps[-1] for steps in other)
    assert reset == {"event": "reset", "session": session, "found": False}, reset
    # The other user's "same" session starts empty, like any new one of its own.
    assert same_name["usage"]["prompt_tokens"] == fresh["usage"]["prompt_tokens"], other
    assert mine["usage"]["prompt_tokens"] > fresh["usage"]["prompt_tokens"] + 10
    with connect(edge.socket_path) as c:
        again = ask(c, "s3", question, session=session)  # still there, and still ours
    assert again["usage"]["prompt_tokens"] > mine["usage"]["prompt_tokens"]
    record(
        "isolation: another user names a session",
        category="security",
        load="2 users (uid 0 and uid 65534) on the socket",
        faults="the other user resets and asks in the first user's session name",
        inputs="prompt_tokens compared with a fresh session",
        accepted=5,
        answered=5,
        lost=0,
        duplicated=0,
        figures={
            "owner_prompt_tokens": mine["usage"]["prompt_tokens"],
            "other_prompt_tokens": same_name["usage"]["prompt_tokens"],
            "other_reset_found": reset["found"],
        },
    )


def test_results_are_per_client(stack: dict[str, Any], edge: Daemon) -> None:  # noqa: F811
    rid = f"r-{uuid.uuid4().hex[:6]}"
    with connect(edge.socket_path) as c:
        done = ask(c, rid, "Name a metal.", escalate=True)
        assert done["escalation"]["status"] == "answered", done
        esc_id = done["escalation"]["id"]
        assert c.op("result", id=rid)["status"] == "answered"
    other = as_other_user(
        edge.socket_path, [{"op": "result", "id": rid}, {"op": "result", "id": esc_id}]
    )
    for steps, key in zip(other, (rid, esc_id)):
        assert steps[-1] == {"event": "result", "id": key, "status": "unknown"}, steps
    # An MQTT requester's result is its reply topic's alone.
    owner, snoop = Requester(stack["local"].port), Requester(stack["local"].port)
    try:
        owner.wait_online(f"edgeagent/{NODE}/status")
        mqtt_rid = f"m-{uuid.uuid4().hex[:6]}"
        owner.publish(f"edgeagent/{NODE}/ask", {"id": mqtt_rid, "prompt": "Name a gas.",
                      "max_tokens": 4, "escalate": True}, correlation=b"c1",
                      response_topic=owner.reply_topic)  # fmt: skip
        assert owner.finals({mqtt_rid})[mqtt_rid][-1]["event"] == "done"
        for who in (snoop, owner):
            who.publish(f"edgeagent/{NODE}/ask", {"op": "result", "id": mqtt_rid},
                        response_topic=who.reply_topic, correlation=b"q")  # fmt: skip
        seen_by_snoop, _ = snoop.next()
        seen_by_owner, _ = owner.next()
    finally:
        owner.close()
        snoop.close()
    assert seen_by_snoop == {"event": "result", "id": mqtt_rid, "status": "unknown"}
    assert seen_by_owner["status"] == "answered" and seen_by_owner["request_id"] == mqtt_rid
    with connect(edge.socket_path) as c:  # nor does a terminal find it
        assert c.op("result", id=mqtt_rid)["status"] == "unknown"
    record(
        "isolation: results asked for by another client",
        category="security",
        load="2 escalations (socket, MQTT) and 6 result ops",
        faults="another user / reply topic / transport asks for the result by request or "
        "escalation id",
        inputs="guessable request ids",
        accepted=2,
        answered=2,
        lost=0,
        duplicated=0,
        figures={"results_leaked": 0},
    )


def test_cached_cells_of_another_client_are_not_observable(edge: Daemon) -> None:
    note = " ".join(f"Valve {i} on line 3 reads {i * 7} bar." for i in range(30))
    with connect(edge.socket_path) as c:
        # escalate=false: the note is long enough for the prompt_tokens rule
        first = ask(c, "c1", f"{note} Which valve is highest?", escalate=False)
    public = first["usage"]["cached_tokens"]  # the template and the system prompt
    probe = {"id": "c2", "prompt": f"{note} Which valve is lowest?", "max_tokens": 4,
             "escalate": False}  # fmt: skip
    theirs = as_other_user(edge.socket_path, [probe])[0][-1]
    assert theirs["event"] == "done", theirs
    # Another user's prompt shares 300+ tokens with the first one but reuses none of them.
    assert theirs["usage"]["cached_tokens"] <= public + 2, (first["usage"], theirs["usage"])
    with connect(edge.socket_path) as c:
        mine = ask(c, "c3", f"{note} Which valve is lowest?", escalate=False)
    assert mine["usage"]["cached_tokens"] > public + 200, mine["usage"]  # the owner's own
    record(
        "isolation: prompt cache as an oracle across clients",
        category="security",
        load="3 requests sharing a 300-token note, from 2 users",
        faults="another user probes for a prompt someone else sent",
        inputs="usage.cached_tokens compared",
        accepted=3,
        answered=3,
        lost=0,
        duplicated=0,
        figures={
            "shared_prompt_tokens": mine["usage"]["cached_tokens"],
            "other_user_cached_tokens": theirs["usage"]["cached_tokens"],
        },
    )


def test_the_daemons_files_are_its_own(stack: dict[str, Any], edge: Daemon) -> None:  # noqa: F811
    spools = list(stack["work"].glob("iso.sqlite*"))
    assert len(spools) >= 2, spools  # the database and its write-ahead log
    for path in spools:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    prefix = Path(edge.workdir) / "cache" / "prefix"
    assert stat.S_IMODE(prefix.stat().st_mode) & 0o077 == 0
    files = list(prefix.iterdir())
    assert any(f.suffix == ".kv" for f in files), files  # the system prompt's snapshot
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_hostile_reply_topics_do_not_take_the_link_down(
    stack: dict[str, Any],  # noqa: F811
    edge: Daemon,
) -> None:
    r = Requester(stack["local"].port)
    spy = Sniffer(stack["local"].port)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")
        ask_topic = f"edgeagent/{NODE}/ask"
        hostile = ["r/\u0001x", "a/\ud800", "$SYS/x", "a/+/b", "a/#", "x" * 70_000, ""]
        for i, topic in enumerate(hostile):
            body = json.dumps({"id": f"h{i}", "prompt": "Hi.", "max_tokens": 1, "reply_to": topic})
            r.publish(ask_topic, body.encode())
        # Each hostile one again, with a good Response Topic: that one gets the error.
        for i, topic in enumerate(hostile):
            r.publish(ask_topic, {"id": f"g{i}", "prompt": "Hi.", "reply_to": topic},
                      response_topic=r.reply_topic)  # fmt: skip
        r.publish(ask_topic, {"id": "ok", "prompt": "Name a colour.", "max_tokens": 2},
                  response_topic=r.reply_topic)  # fmt: skip
        finals = r.finals({f"g{i}" for i in range(len(hostile))} | {"ok"})
        # U+FEFF is valid in MQTT 5 and mosquitto passes it on; paho 2.2 alone took it for a
        # malformed packet and dropped the connection, again after every redelivery.
        bom = f"{r.reply_topic}/\ufeff"
        r.client.subscribe(bom, 1)
        time.sleep(0.3)
        r.publish(ask_topic, {"id": "bom", "prompt": "Hi.", "max_tokens": 1},
                  response_topic=bom)  # fmt: skip
        while (bom_done := r.next(topic=bom)[0])["event"] not in ("done", "error"):
            pass
        time.sleep(1)
        seen = spy.seen()
    finally:
        r.close()
        spy.close()
    assert finals["ok"][-1]["event"] == "done", finals["ok"]
    assert bom_done["event"] == "done" and bom_done["id"] == "bom", bom_done
    for i in range(len(hostile)):
        assert finals[f"g{i}"][-1]["code"] == "bad_request", finals[f"g{i}"]
    published = {t for t, _ in seen}
    assert not [t for t in published if t.startswith(("r/", "a/", "$", "xxx"))], published
    with connect(edge.socket_path) as c:
        mqtt = c.op("status")["mqtt"]
    assert mqtt["connected"] and mqtt.get("disconnects", 0) == 0, mqtt
    record(
        "isolation: hostile reply topics on MQTT",
        category="security",
        load=f"{2 * len(hostile) + 2} requests",
        faults="reply_to with a control character, a lone surrogate, $SYS, wildcards, "
        "70,000 bytes, empty; a Response Topic with U+FEFF",
        inputs="local broker watched for publishes; the daemon's disconnect counter",
        accepted=2,
        answered=2,
        refused=len(hostile),
        lost=0,
        duplicated=0,
        figures={"disconnects": mqtt.get("disconnects", 0), "bad_topics_published": 0},
    )


def test_one_client_cannot_fill_the_spool(
    stack: dict[str, Any],  # noqa: F811
) -> None:
    """With the cloud unreachable, escalations wait in the spool; one client's share of it is
    bounded, so another client's questions still get in."""
    workdir = shared_dir()
    dead = free_port()  # nothing listens: the cloud link stays down
    text = (
        config_text(node_id="iso-quota")
        + 'group = "nogroup"\n'
        + daemon_extra(stack, "iso-quota", cloud_port=dead, offline="queue", client_spool_max=2)
    )
    d = Daemon(workdir, text).start()
    try:
        with connect(d.socket_path) as c:
            queued = [ask(c, f"q{i}", f"Question {i}?", escalate=True) for i in range(3)]
            status = c.op("status")["escalation"]
        assert [q["source"] for q in queued[:2]] == ["queued", "queued"], queued
        refused = queued[2]
        assert refused["source"] == "local" and refused["text"], refused
        assert refused["escalation"]["status"] == "refused", refused
        assert "at most 2" in refused["escalation"]["message"]
        assert status["refused_quota"] == 1 and status["spool"]["waiting"] == 2, status
        other = as_other_user(
            d.socket_path, [{"id": "n1", "prompt": "Mine?", "max_tokens": 4, "escalate": True}]
        )[0][-1]
        assert other["source"] == "queued", other
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    record(
        "isolation: one client floods the spool",
        category="security",
        load="3 escalations from one user, 1 from another, cloud unreachable",
        faults="a client over its spool quota (client_spool_max = 2)",
        inputs="offline = queue",
        accepted=4,
        answered=4,
        lost=0,
        duplicated=0,
        figures={"queued": 3, "answered_locally_over_quota": 1},
    )


def test_units_keep_terminals_out_of_the_daemons_files() -> None:
    socket_unit = (ROOT / "systemd" / "edgeagent.socket").read_text()
    service = (ROOT / "systemd" / "edgeagent.service").read_text()
    assert "SocketGroup=edgeagent-clients" in socket_unit and "SocketMode=0660" in socket_unit
    for line in ("StateDirectoryMode=0700", "CacheDirectoryMode=0700", "UMask=0077",
                 "Group=edgeagent"):  # fmt: skip
        assert line in service.splitlines(), line
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert 'groupadd --system "$CLIENT_GROUP"' in install
    assert "CLIENT_GROUP=edgeagent-clients" in install


class HostileWorker(ScriptedWorker):
    """A cloud 'worker' that answers every escalation with too much: a stream of tokens past
    the edge's bound, then a `done` whose text is over it and whose other fields are of the
    wrong types. It is another machine; the edge must not take its word for anything."""

    name = "hostile"

    def __init__(self, port: int, text: str) -> None:
        self.text = text
        super().__init__(port)

    def _on_message(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        esc_id = json.loads(msg.payload)["escalation_id"]
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData
        reply = msg.properties.ResponseTopic
        for _ in range(4):
            token = {"event": "token", "escalation_id": esc_id, "text": self.text[:1500]}
            c.publish(reply, json.dumps(token), 1, properties=props)
        done = {"event": "done", "escalation_id": esc_id, "text": self.text,
                "model": ["not", "text"], "usage": {"prompt_tokens": "many"}}  # fmt: skip
        c.publish(reply, json.dumps(done), 1, properties=props)


def test_an_oversized_cloud_answer_is_refused_and_the_local_answer_stands(
    stack: dict[str, Any],  # noqa: F811
    daemon_factory: Callable[..., Daemon],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cloud = Broker(tmp_path_factory.mktemp("hostile-broker")).start()
    worker = HostileWorker(cloud.port, "x" * 5000)
    try:
        d = daemon_factory(
            node_id="iso-big",
            extra=daemon_extra(stack, "iso-big", cloud_port=cloud.port, max_answer_bytes=4096),
        )
        wait_link(d, True)
        with connect(d.socket_path) as c:
            c.send({"id": "big", "prompt": "Name a metal.", "max_tokens": 4, "escalate": True})
            events = c.until_final("big")
            status = c.op("status")["escalation"]
            assert c.op("result", id="big")["status"] == "failed"
    finally:
        worker.close()
        cloud.stop()
    done = events[-1]
    assert done["event"] == "done" and done["source"] == "local" and done["text"], done
    assert done["escalation"]["status"] == "cloud_error", done
    assert "at most 4096 bytes" in done["escalation"]["message"]
    restarts = [i for i, e in enumerate(events) if e["event"] == "restart"]
    assert restarts, events  # the cloud's tokens are void: the local answer starts again
    after = events[restarts[-1] + 1 : -1]
    assert "".join(e["text"] for e in after if e["event"] == "token") == done["text"]
    cloud_tokens = [e for e in events if e["event"] == "token" and set(e["text"]) == {"x"}]
    assert sum(len(e["text"]) for e in cloud_tokens) <= 4096, len(cloud_tokens)
    assert status["answers_refused"] == 1, status
    record(
        "isolation: a cloud worker answers with too much",
        category="security",
        load="1 escalation",
        faults="a worker streams 6,000 bytes of tokens and a 5,000-byte answer with mistyped "
        "fields, over max_answer_bytes = 4096",
        inputs="escalate = true",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"cloud_bytes_passed_on": sum(len(e["text"]) for e in cloud_tokens)},
    )
