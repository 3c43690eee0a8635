"""The HTTP front end end to end: a real daemon with the real model, driven by the official
`openai` SDK (sync and async, streaming and not), curl and raw HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, config_text, connect, http_section
from tests.mqtt_helpers import free_port
from tests.test_security_mqtt import make_ca, make_cert

QUESTION = "Name one tool for checking a motor's insulation. One short sentence."
KEYS = {"line-3": "k3-0123456789abcdef0123", "line-4": "k4-fedcba9876543210fedc"}


def tls_context(d: Daemon) -> Optional[ssl.SSLContext]:
    """For a daemon serving HTTPS: a context trusting only its test CA."""
    ca = getattr(d, "ca", None)
    return ssl.create_default_context(cafile=str(ca)) if ca else None


def client(d: Daemon, key: str = "no-key", **kw: Any) -> openai.OpenAI:
    context = tls_context(d)
    if context is not None:
        kw["http_client"] = openai.DefaultHttpxClient(verify=context)
    return openai.OpenAI(base_url=f"{d.http_url}/v1", api_key=key, max_retries=0, **kw)


def raw(d: Daemon, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]]
        = None, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One HTTP request as a plain client sends it: (status, headers, body)."""
    context = tls_context(d)
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", d.http_port, timeout=timeout, context=context)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=timeout)
    )
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def streaming(sdk: openai.OpenAI, question: str, max_tokens: int) -> tuple[Any, Iterator[Any]]:
    """A streamed answer that has started: (the stream, its chunks from the second on)."""
    stream = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        stream=True,
    )  # fmt: skip
    it = iter(stream)
    next(it)
    return stream, it


def error_of(body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    assert set(obj["error"]) == {"message", "type", "code", "param"}, obj
    return obj["error"]  # type: ignore[no-any-return]


def scrape(
    d: Daemon, key: Optional[str] = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, hdrs, body = raw(d, "GET", "/metrics", headers=headers)
    assert status == 200, body
    assert hdrs["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon reachable from other machines (0.0.0.0), so it needs keys, serving HTTPS with
    a certificate from a test CA; one request in flight per key, so a second one is `busy`."""
    pki = tmp_path_factory.mktemp("pki")
    keys = pki / "http-api-keys"
    keys.write_text("# the line's clients\n" + "".join(f"{n}: {k}\n" for n, k in KEYS.items()))
    keys.chmod(0o600)
    ca = make_ca(pki, "kiosk-ca")
    cert, key = make_cert(pki, "edge-box", ca, server=True)
    port = free_port()
    extra = (f'\n[http]\nlisten = ["0.0.0.0:{port}"]\napi_keys_file = "{keys}"\n'
             f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
             "max_inflight_per_key = 1\nmax_connections = 12\n")  # fmt: skip
    text = config_text(http=False)
    d = Daemon(tmp_path_factory.mktemp("keyed"), text + extra)
    d.http_port, d.http_url = port, f"https://127.0.0.1:{port}"
    d.ca = ca[0]  # type: ignore[attr-defined]
    d.start()
    yield d
    d.stop()


# --- the API through the official SDK ------------------------------------------------------


def test_chat_completion_matches_the_socket_answer(daemon: Daemon) -> None:
    """The same greedy request over HTTP and the socket: same text, same token counts."""
    reply = client(daemon).chat.completions.create(
        model="anything", messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24, temperature=0,
    )  # fmt: skip
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.model.startswith("qwen"), "answers name the model that served them"
    with connect(daemon.socket_path) as c:
        c.send({"id": "same", "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 24, "temperature": 0})  # fmt: skip
        done = c.until_final("same")[-1]
    assert done["event"] == "done"
    assert choice.message.content == done["text"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == done["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == done["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == done["usage"]["total_tokens"]
    extra = reply.model_extra or {}
    assert extra["source"] == "local" and "ttft_ms" in extra["timings"]


def test_streaming_gives_the_same_answer_in_chunks_and_usage_last(daemon: Daemon) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = client(daemon).chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client(daemon).chat.completions.create(
        model="m", messages=messages, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 3, "the answer came in one piece, not streamed"
    assert "".join(texts) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and (finish[0].model_extra or {})["source"] == "local"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_async_client_streams_two_answers_at_once(daemon: Daemon) -> None:
    async def ask(sdk: openai.AsyncOpenAI, question: str) -> str:
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}],
            max_tokens=16, temperature=0, stream=True,
        )  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def both() -> list[str]:
        sdk = openai.AsyncOpenAI(base_url=f"{daemon.http_url}/v1", api_key="x", max_retries=0)
        try:
            return list(
                await asyncio.gather(ask(sdk, "What is a PLC?"), ask(sdk, "What is a VFD?"))
            )
        finally:
            await sdk.close()

    answers = asyncio.run(both())
    assert all(answers) and answers[0] != answers[1]


def test_completions_models_and_stop(daemon: Daemon) -> None:
    sdk = client(daemon)
    models = sdk.models.list()
    assert len(models.data) == 1 and models.data[0].id.startswith("qwen")
    text = sdk.completions.create(model=models.data[0].id, prompt="Count from 1 to 9 with commas.",
                                  max_tokens=24, temperature=0, stop=["5"])  # fmt: skip
    assert text.object == "text_completion" and text.choices[0].text
    assert "5" not in text.choices[0].text and "4" in text.choices[0].text
    seeded = [
        sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Invent a machine name."}],
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=1234,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1], "the same seed must give the same sampled answer"


# --- errors in OpenAI's shape, with the right status -------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "must be 1"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 7},
            "temperature",
            "0 to 2",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
            "logprobs",
            "not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
            "frobnicate",
            "unrecognized",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "tools are not supported"),
        ({"messages": []}, "messages", "non-empty"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
            "max_tokens",
            "from 1 to",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_parameter(daemon: Daemon, body: dict[str, Any],
                                                   param: str, words: str) -> None:  # fmt: skip
    status, _h, out = raw(daemon, "POST", "/v1/chat/completions", body)
    assert status == 400
    err = error_of(out)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"]


def test_transport_errors_are_json_too(daemon: Daemon) -> None:
    status, _h, out = raw(daemon, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "invalid JSON" in error_of(out)["message"]
    status, _h, out = raw(daemon, "POST", "/v1/chat/completions", b"{}",
                          {"Content-Type": "text/plain"})  # fmt: skip
    assert status == 415 and error_of(out)["code"] == "unsupported_media"
    status, _h, out = raw(daemon, "GET", "/v1/nothing-here")
    assert status == 404 and error_of(out)["code"] == "not_found"
    status, hdrs, out = raw(daemon, "GET", "/v1/chat/completions")
    assert status == 405 and error_of(out)["code"] == "method_not_allowed"
    assert hdrs["allow"] == "POST"
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    status, _h, out = raw(daemon, "POST", "/v1/chat/completions", big)
    assert status == 413 and error_of(out)["code"] == "too_large"
    status, _h, out = raw(daemon, "GET", "/v1/edgeagent/results/nope")
    assert status == 404 and error_of(out)["code"] == "not_found"


def test_too_long_and_timeout_statuses(daemon: Daemon) -> None:
    sdk = client(daemon)
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "valve " * 3000}], max_tokens=8)  # fmt: skip
    assert too_long.value.code == "context_length_exceeded"
    status, hdrs, out = raw(daemon, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Write a long essay on pumps."}],
        "max_tokens": 200, "deadline_ms": 1})  # fmt: skip
    assert status == 504 and error_of(out)["code"] == "timeout"
    assert hdrs["x-should-retry"] == "false", "the SDKs must not run it again"


def test_a_rebound_host_name_is_refused_without_keys(daemon: Daemon) -> None:
    """DNS rebinding: a page from elsewhere that made its name point at 127.0.0.1."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _h, out = raw(daemon, "POST", "/v1/chat/completions", body,
                          {"Host": f"evil.example:{daemon.http_port}"})  # fmt: skip
    assert status == 403 and error_of(out)["code"] == "forbidden_host"
    status, _h, _out = raw(daemon, "POST", "/v1/chat/completions", body,
                           {"Host": f"localhost:{daemon.http_port}"})  # fmt: skip
    assert status == 200


# --- SSE framing as curl sees it --------------------------------------------------------


def test_curl_sees_one_data_line_per_event_and_done_last(daemon: Daemon) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16,
                       "stream": True, "temperature": 0})  # fmt: skip
    out = subprocess.run(
        ["curl", "-sS", "-N", "-D", "-", "-H", "Content-Type: application/json", "-d", body,
         f"{daemon.http_url}/v1/chat/completions"],
        capture_output=True, timeout=120, check=True,
    ).stdout.decode()  # fmt: skip
    head, _, events = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head.lower()
    blocks = events.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    blocks = blocks[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b[6:]) for b in blocks[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1


# --- a client that goes away ------------------------------------------------------------


def test_a_client_that_disconnects_stops_its_generation(daemon: Daemon) -> None:
    before = scrape(daemon)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=120)
    body = {"messages": [{"role": "user", "content": "List 100 maintenance tasks, numbered."}],
            "max_tokens": 250, "stream": True}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while seen.count(b"data: ") < 4:  # a few tokens in
        seen += resp.read1(4096)
    conn.sock.shutdown(2)  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = scrape(daemon)
        if metric(
            after, "edgeagent_requests_total", front_end="http", outcome="cancelled"
        ) > metric(before, "edgeagent_requests_total", front_end="http", outcome="cancelled"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the request was not cancelled")
    assert metric(after, "edgeagent_slots_busy") == 0
    stopped = re.findall(r"chatcmpl-\w+: cancelled cancelled after (\d+) tokens", daemon.log())
    assert stopped and int(stopped[-1]) < 100, "the generation went on after the client left"


# --- health and metrics -----------------------------------------------------------------


def test_health_and_metrics_move_with_requests(daemon: Daemon) -> None:
    status, _h, body = raw(daemon, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["slots_idle"] + health["slots_processing"] >= 1 and health["queue_depth"] == 0
    before = scrape(daemon)
    client(daemon).chat.completions.create(model="m", messages=[
        {"role": "user", "content": "Say OK."}], max_tokens=4)  # fmt: skip
    with connect(daemon.socket_path) as c:
        c.send({"id": "m1", "prompt": "Say OK.", "max_tokens": 4})
        c.until_final("m1")
    raw(daemon, "POST", "/v1/chat/completions", {"messages": []})
    after = scrape(daemon)
    for front_end in ("http", "socket"):
        assert (
            metric(after, "edgeagent_requests_total", front_end=front_end, outcome="local")
            == metric(before, "edgeagent_requests_total", front_end=front_end, outcome="local") + 1
        )
    assert metric(after, "edgeagent_generated_tokens_total") > metric(
        before, "edgeagent_generated_tokens_total"
    )
    assert (
        metric(after, "edgeagent_time_to_first_token_seconds_count")
        == metric(before, "edgeagent_time_to_first_token_seconds_count") + 2
    )
    assert metric(after, "edgeagent_prompt_tokens_evaluated_total") > 0
    assert (
        sum(v for (n, _l), v in after.items() if n == "edgeagent_prompt_cache_requests_total") > 0
    )
    assert metric(after, "edgeagent_ready") == 1
    assert metric(after, "process_resident_memory_bytes") > 100e6


# --- keys -------------------------------------------------------------------------------


def test_https_with_the_configured_certificate(keyed: Daemon) -> None:
    """The kiosk's client trusts the box's CA; plain HTTP on the same port gets nothing."""
    models = client(keyed, KEYS["line-3"]).models.list()
    assert models.data[0].id.startswith("qwen")
    plain = http.client.HTTPConnection("127.0.0.1", keyed.http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/health")
        plain.getresponse().read()
    untrusted = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        http.client.HTTPSConnection("127.0.0.1", keyed.http_port, timeout=10,
                                    context=untrusted).request("GET", "/health")  # fmt: skip


def test_keys_are_required_and_are_the_client_identity(keyed: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-0000000000"},
        {"Authorization": KEYS["line-3"]},
    ):
        status, hdrs, out = raw(keyed, "POST", "/v1/chat/completions", body, headers)
        assert status == 401 and error_of(out)["code"] == "invalid_api_key"
        assert hdrs["www-authenticate"].startswith("Bearer")
    assert raw(keyed, "GET", "/metrics")[0] == 401
    assert raw(keyed, "GET", "/v1/models")[0] == 401
    assert raw(keyed, "GET", "/health")[0] == 200, "health needs no key"
    assert scrape(keyed, KEYS["line-4"])
    # A session is the key's own: the other key naming it gets a conversation of its own.
    three, four = client(keyed, KEYS["line-3"]), client(keyed, KEYS["line-4"])
    first = three.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "My machine is called Heron-7. Say OK."}],
        max_tokens=8, temperature=0, extra_body={"session": "shift"},
    )  # fmt: skip
    assert first.choices[0].message.content
    other = four.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is my machine called?"}],
        max_tokens=16, temperature=0, extra_body={"session": "shift"},
    )  # fmt: skip
    again = three.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is my machine called?"}],
        max_tokens=16, temperature=0, extra_body={"session": "shift"},
    )  # fmt: skip
    assert other.usage.prompt_tokens < again.usage.prompt_tokens  # type: ignore[union-attr]
    assert "Heron" not in (other.choices[0].message.content or "")


def test_a_key_that_is_not_ascii_is_refused_like_a_wrong_one(keyed: Daemon) -> None:
    context = tls_context(keyed)
    conn = http.client.HTTPSConnection("127.0.0.1", keyed.http_port, timeout=10, context=context)
    conn.putrequest("GET", "/v1/models")
    conn.putheader("Authorization", b"Bearer \xe9\xff-not-a-key-0123456789")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 401 and error_of(resp.read())["code"] == "invalid_api_key"
    conn.close()


def hold_connections(d: Daemon, count: int) -> list[socket.socket]:
    """Connections that never send a request (nor a TLS hello)."""
    held = [socket.create_connection(("127.0.0.1", d.http_port), timeout=10) for _ in range(count)]
    time.sleep(0.3)
    return held


def wait_healthy(d: Daemon) -> None:
    deadline = time.monotonic() + 10
    while raw(d, "GET", "/health", timeout=10)[0] != 200:
        assert time.monotonic() < deadline, "closed connections were not counted off"
        time.sleep(0.1)


def test_connections_past_the_limit_get_503(daemon: Daemon) -> None:
    """Connections that never send a request use no more than max_connections (128)."""
    held = hold_connections(daemon, 128)
    try:
        status, hdrs, out = raw(daemon, "GET", "/health", timeout=10)
        assert status == 503 and error_of(out)["code"] == "busy" and hdrs["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    wait_healthy(daemon)


def test_tls_connections_past_the_limit_are_closed_before_the_handshake(keyed: Daemon) -> None:
    """With TLS, connections count from the TCP accept, silent handshakes too (limit 12)."""
    held = hold_connections(keyed, 12)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            raw(keyed, "GET", "/health", timeout=10)
    finally:
        for sock in held:
            sock.close()
    wait_healthy(keyed)


def test_a_listen_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    precious = tmp_path / "escalations.sqlite"
    precious.write_text("the spool")
    res = run_refused(tmp_path, f'\n[http]\nlisten = ["127.0.0.1:0", "{precious}"]\n')
    assert res.returncode == 4, res.stderr
    assert f"http.listen: cannot listen on {precious}: {precious} exists and is not a socket" in (
        res.stderr
    )
    assert precious.read_text() == "the spool"


def test_one_key_over_its_limit_gets_429_with_retry_after(keyed: Daemon) -> None:
    stream, _it = streaming(client(keyed, KEYS["line-3"]), "List 50 pump parts, numbered.", 120)
    status, hdrs, out = raw(keyed, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                            {"Authorization": f"Bearer {KEYS['line-3']}"})  # fmt: skip
    assert status == 429 and error_of(out)["code"] == "busy" and hdrs["retry-after"] == "1"
    # The other key is not held back by this one's limit.
    other = client(keyed, KEYS["line-4"]).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)  # fmt: skip
    assert other.choices[0].message.content is not None
    stream.close()


def run_refused(tmp_path: Path, http_table: str) -> subprocess.CompletedProcess[str]:
    """`edgeagent run` with this [http] table, expected to end before the model loads."""
    cfg = tmp_path / "c.toml"
    text = config_text(http=False).replace("@SOCKET@", str(tmp_path / "s.sock"))
    cfg.write_text(text + http_table)
    res = subprocess.run([sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert " loaded in " not in res.stderr and "Traceback" not in res.stderr, res.stderr
    return res


def test_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    res = run_refused(tmp_path, '\n[http]\nlisten = ["127.0.0.1:0", "0.0.0.0:18080"]\n')
    assert res.returncode == 2
    assert f"{tmp_path / 'c.toml'}: http.listen: 0.0.0.0:18080 is reachable from other" in (
        res.stderr
    )


def test_a_taken_port_ends_the_start_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_refused(tmp_path, http_section(port))
    assert res.returncode == 4, res.stderr
    assert f"{tmp_path / 'c.toml'}: http.listen: cannot listen on 127.0.0.1:{port}: " in res.stderr


# --- loading and stopping ---------------------------------------------------------------


def test_503_while_loading_and_while_stopping(tmp_path: Path, model_file: Path) -> None:
    """A long system prompt read at start keeps the daemon loading for a few seconds."""
    port = free_port()
    system = "You are the maintenance assistant of line 3. " + "Check valves and pumps. " * 120
    text = (config_text(http=False) + http_section(port)).replace(
        "[model]\n", f'[model]\nsystem_prompt = "{system}"\n').replace(
        "[engine]\n", '[engine]\nprefix_cache_dir = "off"\n')  # fmt: skip
    d = Daemon(tmp_path, text)
    seen: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                status, _h, body = raw(d, "GET", "/health", timeout=5)
                seen.append((status, body))
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        d.start()
        poller.join(60)
        loading = [json.loads(b) for s, b in seen if s == 503]
        assert loading and loading[0] == {"status": "loading"}, seen[:3]
        assert seen[-1][0] == 200
        # Stopping: a long answer is finishing while new calls are refused with 503.
        _stream, it = streaming(client(d), "List 40 checks, numbered.", 60)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, _h, out = raw(d, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert status == 503 and error_of(out)["code"] == "stopping"
        assert json.loads(raw(d, "GET", "/health")[2]) == {"status": "stopping"}
        rest = list(it)
        assert rest[-1].choices[0].finish_reason in ("stop", "length"), "the drain let it finish"
        assert d.proc.wait(30) == 0
    finally:
        stop.set()
        poller.join(5)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
