"""Security on the MQTT side: TLS with client certificates and passwords on both brokers, ACL
refusals, broker impostors, secrets kept out of every log and status, redaction on the way to
the cloud. Everything is real: mosquitto with TLS listeners, password files and ACLs made here,
certificates made here with openssl, the OpenAI-compatible stand-in behind an API key, the
cloud worker and the daemons."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Daemon, Process, connect, openai_stand_in
from tests.mqtt_helpers import Broker, Requester
from tests.reliability import record

STAND_IN = "stand-in-llama3-8b"
NODE = "sec-node"
REDACT = [
    [r"SN-\d{6}", "[serial]"],
    [r"\b\d{1,3}(?:\.\d{1,3}){3}\b", "[ip]"],
    [r"badge \d{5}", "badge [id]"],
]

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed")


# --- certificates ---------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return crt, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A certificate signed by `ca`: for 127.0.0.1 (server) or a client called `name`."""
    crt, key, csr, ext = (d / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={'127.0.0.1' if server else name}", "-keyout", str(key),
            "-out", str(csr))  # fmt: skip
    usage = "extendedKeyUsage=clientAuth\n"
    if server:
        usage = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + usage)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-out", str(crt), "-extfile", str(ext))  # fmt: skip
    key.chmod(0o600)
    return crt, key


def tls_listener(ca: Path, cert: tuple[Path, Path], *, client_certs: bool) -> list[str]:
    return [f"cafile {ca}", f"certfile {cert[0]}", f"keyfile {cert[1]}",
            f"require_certificate {'true' if client_certs else 'false'}"]  # fmt: skip


# --- a raw listener on a broker ------------------------------------------------------------


class Sniffer:
    """Every message on a broker (retained ones too), raw, to prove what was published."""

    def __init__(self, port: int, username: str, password: str, ca: Path,
                 cert: tuple[Path, Path] | None = None) -> None:  # fmt: skip
        self.payloads: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.seen: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.tls_set(str(ca), *(str(f) for f in cert or ()))
        ready: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_: ready.put(True)
        self.client.on_connect = lambda c, *_: c.subscribe("#", 1)
        self.client.on_message = lambda _c, _u, m: self.payloads.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.get(timeout=10)

    def collect(self) -> list[tuple[str, bytes, bool]]:
        while not self.payloads.empty():
            self.seen.append(self.payloads.get())
        return self.seen

    def wait_for(self, pred: Callable[[str, bytes], bool], timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for topic, payload, _ in self.collect():
                if pred(topic, payload):
                    return payload
            assert time.monotonic() < deadline, "not seen on the broker"
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the stack ----------------------------------------------------------------------------


LOCAL_ACL = f"""
user edge
topic read edgeagent/{NODE}/ask
topic read edgeagent/{NODE}/ask/deep
topic write edgeagent/{NODE}/status
topic write edgeagent/{NODE}/metrics
topic write replies/#

user terminal
topic write edgeagent/+/ask
topic write edgeagent/+/ask/deep
topic read edgeagent/+/status
topic read edgeagent/+/metrics
topic read replies/#
topic read forbidden/#

user sniffer
topic read #
"""

CLOUD_ACL = f"""
user edge-cloud
topic write edgeagent-cloud/ask
topic read edgeagent-cloud/reply/{NODE}
topic read edgeagent-cloud/worker/+/status

user edge-limited
topic read edgeagent-cloud/reply/sec-limited
topic read edgeagent-cloud/worker/+/status

user worker
topic read edgeagent-cloud/ask
topic write edgeagent-cloud/reply/#
topic readwrite edgeagent-cloud/worker/#

user sniffer
topic read #
"""


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def status_of(d: Daemon) -> dict[str, Any]:
    with connect(d.socket_path) as c:
        return c.op("status")


@pytest.fixture(scope="module")
def stack(
    model_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    daemon_factory: Callable[..., Daemon],
) -> Iterator[dict[str, Any]]:
    """Local and cloud brokers over TLS with passwords and ACLs, the stand-in behind an API key,
    the cloud worker, and the daemon under test with every secret it can have."""
    work = tmp_path_factory.mktemp("sec")
    pki = work / "pki"
    pki.mkdir()
    ca = make_ca(pki, "edgeagent-test-ca")
    rogue_ca = make_ca(pki, "impostor-ca")
    server = make_cert(pki, "broker", ca, server=True)
    impostor_cert = make_cert(pki, "impostor", rogue_ca, server=True)
    daemon_cert = make_cert(pki, "edge-daemon", ca, server=False)
    terminal_cert = make_cert(pki, "terminal", ca, server=False)

    pw = {name: secrets.token_hex(16) for name in
          ("edge", "terminal", "sniffer", "edge-cloud", "edge-limited", "worker")}  # fmt: skip
    api_key = "sk-" + secrets.token_hex(20)
    creds = work / "credentials"  # what systemd's LoadCredential= makes
    creds.mkdir(mode=0o700)
    for name, value in (("mqtt-password", pw["edge"]), ("cloud-password", pw["edge-cloud"]),
                        ("limited-password", pw["edge-limited"]),
                        ("worker-password", pw["worker"]), ("cloud-api-key", api_key)):  # fmt: skip
        (creds / name).write_text(value + "\n")
        (creds / name).chmod(0o600)

    with contextlib.ExitStack() as cleanup:
        mp = cleanup.enter_context(pytest.MonkeyPatch.context())
        mp.delenv("EDGEAGENT_CLOUD_API_KEY", raising=False)  # the worker reads its key file
        local = Broker(
            tmp_path_factory.mktemp("sec-local"),
            users={k: pw[k] for k in ("edge", "terminal", "sniffer")},
            acl=LOCAL_ACL,
            listener_options=tls_listener(ca[0], server, client_certs=True),
        )
        cloud = Broker(
            tmp_path_factory.mktemp("sec-cloud"),
            users={k: pw[k] for k in ("edge-cloud", "edge-limited", "worker", "sniffer")},
            acl=CLOUD_ACL,
            listener_options=tls_listener(ca[0], server, client_certs=False),
        )
        impostor = Broker(
            tmp_path_factory.mktemp("sec-impostor"),
            listener_options=tls_listener(rogue_ca[0], impostor_cert, client_certs=False),
        )
        for broker in (local, cloud, impostor):
            cleanup.callback(broker.stop)
            broker.start()
        cloud_sniffer = Sniffer(cloud.port, "sniffer", pw["sniffer"], ca[0])
        cleanup.callback(cloud_sniffer.close)
        model_server, model_port = openai_stand_in(
            model_file, work / "llama-server.log", STAND_IN, "--api_key", api_key
        )
        cleanup.callback(model_server.stop)
        worker_cfg = work / "worker.toml"
        worker_cfg.write_text(
            f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {cloud.port}\n'
            f'username = "worker"\npassword_file = "{creds / "worker-password"}"\n'
            "reconnect_min_s = 1\nreconnect_max_s = 1\n"
            f'[cloud.tls]\nenabled = true\nca_file = "{ca[0]}"\n'
            f'[worker]\nworker_id = "w-sec"\nbase_url = "http://127.0.0.1:{model_port}/v1"\n'
            f'model = "{STAND_IN}"\nconcurrency = 1\ntoken_interval_ms = 0\n'
            f'api_key_file = "{creds / "cloud-api-key"}"\n'
            '[log]\nlevel = "debug"\n'
        )
        worker = Process(
            [sys.executable, "-m", "edgeagent", "cloud-worker", "--config", str(worker_cfg)],
            work / "worker.log",
        )
        cleanup.callback(worker.stop)
        worker.start()
        extra = (
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {local.port}\nkeepalive = 5\n'
            'username = "edge"\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
            "metrics_interval_s = 1\n"
            f'[mqtt.tls]\nenabled = true\nca_file = "{ca[0]}"\n'
            f'cert_file = "{daemon_cert[0]}"\nkey_file = "{daemon_cert[1]}"\n'
            f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {cloud.port}\n'
            f'username = "edge-cloud"\npassword_file = "{creds / "cloud-password"}"\n'
            "reconnect_min_s = 1\nreconnect_max_s = 2\n"
            f'[cloud.tls]\nenabled = true\nca_file = "{ca[0]}"\n'
            f"[escalation]\nenabled = true\ntimeout_s = 30.0\nmax_tokens = 8\n"
            f'spool_path = "{work / "spool.sqlite"}"\nredact = {json.dumps(REDACT)}\n'
            '[log]\nlevel = "debug"\n'
        )
        # The MQTT password comes the way systemd hands it over: $CREDENTIALS_DIRECTORY.
        with pytest.MonkeyPatch.context() as creds_env:
            creds_env.setenv("CREDENTIALS_DIRECTORY", str(creds))
            edge = daemon_factory(node_id=NODE, extra=extra)
        cleanup.callback(edge.stop)
        wait_until(lambda: status_of(edge)["escalation"]["link"]["up"], "cloud link up")
        yield {
            "local": local, "cloud": cloud, "impostor": impostor, "worker": worker,
            "model_server": model_server, "model_port": model_port, "edge": edge,
            "ca": ca[0], "daemon_cert": daemon_cert, "terminal_cert": terminal_cert,
            "creds": creds, "pw": pw, "api_key": api_key, "cloud_sniffer": cloud_sniffer,
            "work": work,
        }  # fmt: skip


def terminal(stack: dict[str, Any]) -> Requester:
    cert, key = stack["terminal_cert"]
    return Requester(stack["local"].port, username="terminal", password=stack["pw"]["terminal"],
                     tls=(stack["ca"], cert, key))  # fmt: skip


# --- TLS, passwords, ACLs -------------------------------------------------------------------


def test_mqtt_over_tls_with_client_certificate_and_password(stack: dict[str, Any]) -> None:
    r = terminal(stack)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")
        question = {"id": "tls1", "prompt": "Name a metal.", "max_tokens": 6}
        r.publish(f"edgeagent/{NODE}/ask", question, correlation=b"c-tls1",
                  response_topic=r.reply_topic)  # fmt: skip
        events = r.finals({"tls1"})["tls1"]
    finally:
        r.close()
    done = events[-1]
    assert done["event"] == "done" and done["source"] == "local" and done["text"].strip(), events
    # The broker saw the daemon log in with its user name over the TLS listener (the only one).
    log = stack["local"].log()
    assert re.search(rf"New client connected .* as edgeagent-{NODE} .*u'edge'", log), log[-3000:]
    mqtt_status = status_of(stack["edge"])["mqtt"]
    assert mqtt_status["connected"] and mqtt_status["connect_error"] is None
    record(
        "mqtt: TLS with client certificate and password",
        category="security",
        load="1 request over MQTT v5, TLS both ways, password from $CREDENTIALS_DIRECTORY",
        faults="none (the positive case: only a TLS listener exists)",
        inputs="CA, broker and client certificates made by the test",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"token_events": len(events) - 1},
    )


def test_acl_refused_reply_topic_is_logged_and_nothing_spins(stack: dict[str, Any]) -> None:
    """A requester names a reply topic the broker's ACL does not let the daemon publish to."""
    edge: Daemon = stack["edge"]
    forbidden = f"forbidden/{uuid.uuid4().hex[:8]}"
    r = terminal(stack)
    try:
        r.client.subscribe("forbidden/#", 1)
        r.wait_online(f"edgeagent/{NODE}/status")
        before = status_of(edge)["mqtt"]
        r.publish(f"edgeagent/{NODE}/ask", {"id": "acl1", "prompt": "Name a gas.",
                  "max_tokens": 4}, response_topic=forbidden)  # fmt: skip
        refusal = f"MQTT broker refused our publish to {forbidden}: Not authorized"
        wait_until(lambda: refusal in edge.log(), "the refusal is logged", timeout=60)
        # The daemon goes on serving the same requester on an allowed topic.
        r.publish(f"edgeagent/{NODE}/ask", {"id": "acl2", "prompt": "Name a gas.",
                  "max_tokens": 4}, response_topic=r.reply_topic)  # fmt: skip
        done = r.finals({"acl2"})["acl2"][-1]
        assert done["event"] == "done" and done["text"].strip(), done
        refusals = edge.log().count("MQTT broker refused our publish to")
        after = status_of(edge)["mqtt"]
        leaked = [p for t, p, _ in drain_topics(r, 2.0) if t.startswith("forbidden/")]
    finally:
        r.close()
    assert leaked == []
    assert edge.log().count(f"refused our publish to {forbidden}:") == 1  # its one final
    # The refused request was taken once and acknowledged, not delivered again and again.
    assert after["received"] - before.get("received", 0) == 2, (before, after)
    assert after.get("duplicates", 0) == before.get("duplicates", 0)
    refused = after["publish_refused"] - before.get("publish_refused", 0)
    assert refused >= 1
    assert edge.log().count("MQTT broker refused our publish to") == refusals  # quiet since
    assert edge.proc is not None and edge.proc.poll() is None
    record(
        "mqtt: ACL refuses the daemon's publish",
        category="security",
        load="2 requests: one naming a reply topic the daemon may not publish to, one allowed",
        faults="broker ACL denies the daemon's reply (PUBACK 0x87 Not authorized)",
        inputs="reply topic forbidden/<random>",
        accepted=2,
        answered=2,  # the refused request's final was sent once and refused by the broker
        lost=0,
        duplicated=0,
        figures={"publishes_refused": refused, "redeliveries": 0},
    )


def drain_topics(r: Requester, seconds: float) -> list[tuple[str, Any, Any]]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(r.messages.get(timeout=left))
        except queue.Empty:
            break
    return out


def test_wrong_password_and_impostor_broker_are_refused_and_the_daemon_keeps_serving(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    """The local broker refuses a wrong password; the cloud "broker" is an impostor whose
    certificate our CA did not sign: the daemon must not log in there (its password never
    leaves), must say why on both links, keep serving the socket and retry at its own pace."""
    creds: Path = stack["creds"]
    wrong = creds / "wrong-password"
    wrong.write_text(secrets.token_hex(16) + "\n")
    impostor: Broker = stack["impostor"]
    extra = (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {stack["local"].port}\n'
        f'username = "edge"\npassword_file = "{wrong}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
        f'[mqtt.tls]\nenabled = true\nca_file = "{stack["ca"]}"\n'
        f'cert_file = "{stack["daemon_cert"][0]}"\nkey_file = "{stack["daemon_cert"][1]}"\n'
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {impostor.port}\n'
        f'username = "edge-cloud"\npassword_file = "{creds / "cloud-password"}"\n'
        "reconnect_min_s = 1\nreconnect_max_s = 2\n"
        f'[cloud.tls]\nenabled = true\nca_file = "{stack["ca"]}"\n'
        f'[escalation]\nenabled = true\nspool_path = "{stack["work"] / "bad.sqlite"}"\n'
        '[log]\nlevel = "debug"\n'
    )
    t0 = time.monotonic()
    d = daemon_factory(node_id="sec-bad", extra=extra)
    wait_until(lambda: "MQTT broker refused the connection: Not authorized" in d.log()
               and "CERTIFICATE_VERIFY_FAILED" in d.log(), "both failures logged")  # fmt: skip
    cloud_line = next(line for line in d.log().splitlines() if "CERTIFICATE_VERIFY_FAILED" in line)
    assert "ERROR edgeagent.escalation: cannot connect to the cloud broker " in cloud_line
    assert f"127.0.0.1:{impostor.port}: [SSL: CERTIFICATE_VERIFY_FAILED]" in cloud_line
    with connect(d.socket_path) as c:
        c.send({"id": "bad1", "prompt": "Name a metal.", "max_tokens": 4, "escalate": True})
        done = c.until_final("bad1")[-1]
        status = c.op("status")
    elapsed = time.monotonic() - t0
    assert done["event"] == "done" and done["source"] == "local" and done["text"].strip(), done
    assert done["escalation"]["status"] == "queued"  # kept for when a trusted cloud is back
    m, link = status["mqtt"], status["escalation"]["link"]
    assert not m["connected"] and m["connect_error"] == "refused by the broker: Not authorized"
    assert not link["connected"] and "CERTIFICATE_VERIFY_FAILED" in link["connect_error"]
    # Retrying at the configured pace (at least 1 s apart), not spinning.
    attempts = {"local": m["connect_refused"], "cloud": link["connect_failed"]}
    for name, n in attempts.items():
        assert 1 <= n <= elapsed / 1 + 2, (name, n, elapsed)
    # The impostor never got as far as an MQTT CONNECT: no client id, no user name, no password.
    impostor_log = impostor.log()
    assert "New client connected" not in impostor_log and "edge-cloud" not in impostor_log
    texts = {"impostor broker log": impostor_log, "daemon log": d.log(),
             "status op": json.dumps(status)}  # fmt: skip
    assert_no_secrets(texts, stack, extra=[wrong.read_text().strip()])
    assert d.stop() == 0
    record(
        "mqtt: wrong password and impostor broker",
        category="security",
        load="1 escalated request over the socket while both broker links fail",
        faults="local broker refuses the password; cloud broker's certificate is not ours",
        inputs="a wrong password file; a broker certificate from another CA",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={
            "local_attempts": attempts["local"],
            "cloud_attempts": attempts["cloud"],
            "seconds_observed": round(elapsed, 1),
            "mqtt_connects_reaching_impostor": 0,
        },
    )


def test_acl_refused_escalation_fails_fast_and_is_not_retried(
    stack: dict[str, Any], daemon_factory: Callable[..., Daemon]
) -> None:
    """The cloud broker's ACL lets this node hear workers but not send escalations."""
    sniffer: Sniffer = stack["cloud_sniffer"]
    extra = (
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {stack["cloud"].port}\n'
        f'username = "edge-limited"\npassword_file = "{stack["creds"] / "limited-password"}"\n'
        f'[cloud.tls]\nenabled = true\nca_file = "{stack["ca"]}"\n'
        # Without the refusal being noticed, the request would wait these 60 s for nothing.
        f"[escalation]\nenabled = true\ntimeout_s = 60.0\nmax_tokens = 8\n"
        f'spool_path = "{stack["work"] / "limited.sqlite"}"\n'
    )
    d = daemon_factory(node_id="sec-limited", extra=extra)
    wait_until(lambda: status_of(d)["escalation"]["link"]["up"], "cloud link up")
    with connect(d.socket_path) as c:
        c.send({"id": "lim1", "prompt": "Name a metal.", "max_tokens": 4, "escalate": True})
        done = c.until_final("lim1")[-1]
        esc_id = done["escalation"]["id"]
        assert c.op("result", id="lim1")["status"] == "failed"
        sent = c.op("status")["escalation"]
    assert done["event"] == "done" and done["source"] == "local" and done["text"].strip(), done
    assert done["escalation"]["status"] == "cloud_error"
    refusal = "the cloud broker refused the escalation: Not authorized"
    assert done["escalation"]["message"] == refusal
    assert (f"ERROR edgeagent.escalation: cloud broker refused escalation {esc_id} on "
            "edgeagent-cloud/ask: Not authorized") in d.log()  # fmt: skip
    time.sleep(2)  # a retry loop would show within the reconnect interval
    again = status_of(d)["escalation"]
    assert sent["sent"] == again["sent"] == 1 and again["link"]["publish_refused"] == 1
    assert d.log().count("cloud broker refused escalation") == 1
    assert not [t for t, p, _ in sniffer.collect() if esc_id.encode() in p]
    assert d.stop() == 0  # alive until now, and stops cleanly
    record(
        "cloud: ACL refuses the daemon's escalation",
        category="security",
        load="1 escalated request over the socket",
        faults="cloud broker ACL denies publishing on the escalation topic",
        inputs="a cloud user allowed to read worker statuses only",
        accepted=1,
        answered=1,
        lost=0,
        duplicated=0,
        figures={"escalations_sent": again["sent"], "refused": 1, "resent": 0},
    )


# --- secrets and redaction ------------------------------------------------------------------


def assert_no_secrets(texts: dict[str, str], stack: dict[str, Any], extra: list[str] = ()) -> int:
    """No secret of the stack in any of `texts`; returns how many texts were checked."""
    values = [*stack["pw"].values(), stack["api_key"], *extra]
    for where, text in texts.items():
        for value in values:
            assert value not in text, f"a secret appears in the {where}"
    return len(texts)


def test_secrets_never_appear_in_logs_status_or_on_the_brokers(stack: dict[str, Any]) -> None:
    edge: Daemon = stack["edge"]
    pw = stack["pw"]
    local_sniffer = Sniffer(
        stack["local"].port, "sniffer", pw["sniffer"], stack["ca"], stack["terminal_cert"]
    )
    try:
        # Every secret in use: the MQTT password (a request over MQTT), the cloud password and
        # the API key (an escalation the stand-in answers only with the key).
        r = terminal(stack)
        try:
            r.wait_online(f"edgeagent/{NODE}/status")
            r.publish(f"edgeagent/{NODE}/ask", {"id": "s1", "prompt": "Name a tool.",
                      "max_tokens": 4}, response_topic=r.reply_topic)  # fmt: skip
            assert r.finals({"s1"})["s1"][-1]["event"] == "done"
        finally:
            r.close()
        with connect(edge.socket_path) as c:
            c.send({"id": "s2", "prompt": "Name a tool.", "max_tokens": 4, "escalate": True})
            done = c.until_final("s2")[-1]
            status = c.op("status")
        assert done["source"] == "cloud" and done["model"] == STAND_IN, done
        local_sniffer.wait_for(lambda t, _p: t == f"edgeagent/{NODE}/metrics")
        retained = local_sniffer.wait_for(lambda t, _p: t == f"edgeagent/{NODE}/status")
        assert json.loads(retained)["state"] == "online"
        local_seen = local_sniffer.collect()
    finally:
        local_sniffer.close()
    # The stand-in really insists on the key: without it, no answer.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{stack['model_port']}/v1/models", timeout=5)
    assert refused.value.code == 401
    texts = {
        "daemon log": edge.log(),
        "status op": json.dumps(status),
        "worker log": stack["worker"].log(),
        **{f"local broker message on {t}": p.decode(errors="replace") for t, p, _ in local_seen},
        **{
            f"cloud broker message on {t}": p.decode(errors="replace")
            for t, p, _ in stack["cloud_sniffer"].collect()
        },
    }
    checked = assert_no_secrets(texts, stack)
    assert any(k.startswith("local broker message on") and k.endswith("/status") for k in texts)
    assert any(k.endswith("/metrics") for k in texts)
    record(
        "secrets: never in logs, status or broker messages",
        category="security",
        load="1 MQTT request and 1 escalation, logs at debug level (paho's included)",
        faults="none: the check is for leaks on every output",
        inputs=f"{len(stack['pw']) + 1} secrets (MQTT and cloud passwords, cloud API key)",
        accepted=2,
        answered=2,
        lost=0,
        duplicated=0,
        figures={"outputs_checked": checked, "secrets_found": 0},
    )


def test_redaction_holds_on_every_way_to_the_cloud(stack: dict[str, Any]) -> None:
    """Session history, system messages and MQTT requests: what reaches the cloud broker has
    the redaction rules applied, and the raw values appear nowhere on it."""
    edge: Daemon = stack["edge"]
    sniffer: Sniffer = stack["cloud_sniffer"]
    rnd = secrets.SystemRandom()
    serial = f"SN-{rnd.randrange(10**5, 10**6)}"
    ip = ".".join(str(rnd.randrange(11, 250)) for _ in range(4))
    badge = f"badge {rnd.randrange(10**4, 10**5)}"
    session = f"sess-{uuid.uuid4().hex[:6]}"
    with connect(edge.socket_path) as c:
        # A local turn first: its text (and the local answer) become the session's history.
        c.send({"id": "r1", "session": session, "max_tokens": 8,
                "prompt": f"Unit {serial} at {ip} rattles. Remember that."})  # fmt: skip
        first = c.until_final("r1")[-1]
        assert first["source"] == "local" and "escalation" not in first, first
        c.send({"id": "r2", "session": session, "max_tokens": 8, "escalate": True,
                "prompt": f"I am {badge}. Is that unit safe to run?"})  # fmt: skip
        second = c.until_final("r2")[-1]
    r = terminal(stack)
    try:
        r.wait_online(f"edgeagent/{NODE}/status")
        r.publish(f"edgeagent/{NODE}/ask/deep", {"id": "r3", "max_tokens": 8, "messages": [
            {"role": "system", "content": f"The operator is {badge}."},
            {"role": "user", "content": f"Unit {serial} at {ip}: check what?"}]},
            response_topic=r.reply_topic)  # fmt: skip
        third = r.finals({"r3"})["r3"][-1]
    finally:
        r.close()
    asks = {}
    for done in (second, third):
        assert done["source"] == "cloud" and done["escalation"]["status"] == "answered", done
        esc_id = done["escalation"]["id"]
        raw = sniffer.wait_for(lambda t, p, e=esc_id: t == "edgeagent-cloud/ask"
                               and e.encode() in p)  # fmt: skip
        asks[esc_id] = json.loads(raw)["messages"]
    history, deep = asks[second["escalation"]["id"]], asks[third["escalation"]["id"]]
    assert history[0] == {
        "role": "user",
        "content": "Unit [serial] at [ip] rattles. Remember that.",
    }
    assert history[-1] == {"role": "user", "content": "I am badge [id]. Is that unit safe to run?"}
    assert deep == [{"role": "system", "content": "The operator is badge [id]."},
                    {"role": "user", "content": "Unit [serial] at [ip]: check what?"}]  # fmt: skip
    everything = sniffer.collect()
    raw_values = [serial, serial[3:], ip, badge]
    leaks = [(t, v) for t, p, _ in everything for v in raw_values if v.encode() in p]
    assert leaks == []
    record(
        "redaction: what reaches the cloud broker",
        category="security",
        load="3 requests: a local session turn, an escalated follow-up, an MQTT ask/deep request",
        faults="none: serial, IP address and badge number in history, system and user messages",
        inputs=f"{len(REDACT)} redaction rules",
        accepted=3,
        answered=3,
        lost=0,
        duplicated=0,
        figures={"cloud_messages_checked": len(everything), "raw_values_found": len(leaks)},
    )
