#!/usr/bin/env python3
"""Benchmark edgeagent against raw llama-cpp-python, side by side in one run.

Loads the model in this process with llama-cpp-python (the baseline) and starts a real
`edgeagent run` daemon on a temporary socket, then sends the same prompts to both,
alternating which goes first each round: to the daemon over its Unix socket, over MQTT (when
mosquitto is installed) and over HTTP (the OpenAI API, streamed as Server-Sent Events).
Reports time to first token (TTFT) and decode tokens/s as a client sees them, the daemon's
RSS and its start-to-ready time, and checks them against the targets. With --write, the
figures go into docs/benchmarks.md (and a plot into docs/benchmarks.png when matplotlib is
installed).

    make bench                      # print the figures
    .venv/bin/python scripts/bench.py --write
"""

from __future__ import annotations

import argparse
import gc
import getpass
import http.client
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeagent import __version__, models
from tests.reliability import measured_by

PROMPTS = [
    "What does a programmable logic controller do on a packaging line? Answer briefly.",
    "Give three common causes of a conveyor belt drifting to one side, as a short list.",
    "Explain in two sentences why a motor might overheat when its supply voltage is low.",
    "What is the difference between preventive and predictive maintenance? Keep it short.",
    "List the first steps to take when a pneumatic cylinder moves slower than usual.",
]
MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"


def measure_stream(chunks: Any, is_token: Any) -> tuple[float, float, int]:
    """(ttft_s, tokens_per_s, n_tokens) of a stream; timing starts when called.

    tokens/s is (n - 1) / (end of stream - first token): the same definition on every side,
    so a final end-of-generation step counts alike whether or not a side shows it as a token.
    """
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in chunks:
        if is_token(chunk):
            first = first or time.perf_counter()
            n += 1
    end = time.perf_counter()
    assert first is not None, "no token arrived"
    tps = (n - 1) / (end - first) if n > 1 else float("nan")
    return first - t0, tps, n


def raw_run(llm: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    stream = llm.create_chat_completion(
        [{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0.0, stream=True,
    )  # fmt: skip
    return measure_stream(stream, lambda c: bool(c["choices"][0]["delta"].get("content")))


class SocketClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def request(self, obj: dict[str, Any]) -> Any:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        while True:
            event = json.loads(self.file.readline())
            yield event
            if event["event"] in ("done", "error"):
                if event["event"] == "error":
                    raise RuntimeError(event)
                return


class HttpClient:
    """The OpenAI API as a plain client sends it: one keep-alive connection, SSE read by line."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def run(self, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True}  # fmt: skip

        def chunks() -> Iterator[dict[str, Any]]:
            self.conn.request("POST", "/v1/chat/completions", json.dumps(body),
                              {"Content-Type": "application/json"})  # fmt: skip
            resp = self.conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
            resp.read()

        def is_token(chunk: dict[str, Any]) -> bool:
            return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))

        return measure_stream(chunks(), is_token)


class MqttClient:
    """A paho v5 requester: Response Topic + Correlation Data, one reply topic."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.reply_topic = "bench/replies"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench",
                                  protocol=mqtt.MQTTv5)  # fmt: skip
        self.client.on_message = lambda _c, _u, m: self.events.put(
            (time.perf_counter(), json.loads(m.payload))
        )
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        self.client.subscribe(self.reply_topic, 1)
        time.sleep(0.5)

    def run(self, rid: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = rid.encode()
        req = {"id": rid, "messages": [{"role": "user", "content": prompt}],
               "max_tokens": max_tokens, "temperature": 0.0}  # fmt: skip
        t0 = time.perf_counter()
        self.client.publish("edgeagent/bench/ask", json.dumps(req), 1, False, props)
        first = None
        while True:
            at, event = self.events.get(timeout=120)
            if event.get("id") != rid:
                continue
            if event["event"] == "token" and first is None:
                first = at
            if event["event"] == "error":
                raise RuntimeError(event)
            if event["event"] == "done":
                n = event["usage"]["completion_tokens"]
                assert first is not None
                return first - t0, (n - 1) / (at - first), n

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"user {getpass.getuser()}\n")  # fmt: skip
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def daemon_run(
    client: SocketClient, rid: str, prompt: str, max_tokens: int
) -> tuple[float, float, int]:
    req = {"id": rid, "messages": [{"role": "user", "content": prompt}],
           "max_tokens": max_tokens, "temperature": 0.0}  # fmt: skip
    return measure_stream(client.request(req), lambda e: e["event"] == "token")


def daemon_hello(client: SocketClient, rid: str) -> None:
    """The short request a daemon answers before each measured one (see schedule())."""
    list(client.request({"id": rid, "prompt": "Hello", "max_tokens": 1}))


def schedule(rounds: int, sides: list[str]) -> Iterator[tuple[int, str, str]]:
    """(n, side, question) for each measured request: every round sends each prompt to every
    side, rotating which side goes first.

    The ticket number makes every question new, so only the chat template's preamble can be
    reused (a daemon's slots and prompt cache would otherwise hold the earlier rounds'
    questions). Before each one the caller sends its side the same short request ("Hello",
    1 token), so every side starts from the same KV-cache state.
    """
    n = 0
    for rnd in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            shift = (rnd + i) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                n += 1
                yield n, side, f"Ticket {1000 + n}: {prompt}"


def start_daemon(
    model_file: Path,
    workdir: Path,
    n_ctx: int,
    cpu: str,
    mqtt_port: int,
    name: str = "bench",
    http_port: int = 0,
) -> tuple[subprocess.Popen[bytes], float, str]:
    sock = str(workdir / f"{name}.sock")
    cfg = workdir / f"{name}.toml"
    mqtt = (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\nsession_expiry_s = 0\n'
        if mqtt_port
        else ""
    )
    cfg.write_text(
        f'node_id = "bench"\n[model]\npath = "{model_file}"\nn_ctx = {n_ctx}\n'
        f'max_tokens = 1024\n[cpu]\n{cpu}\n[socket]\npath = "{sock}"\n[http]\n'
        + (f'listen = "127.0.0.1:{http_port}"\n' if http_port else "enabled = false\n")
        + f'[log]\nlevel = "warning"\n{mqtt}'
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)], cwd=workdir
    )
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            c = SocketClient(sock)
            c.sock.sendall(b'{"op": "status"}\n')
            if json.loads(c.file.readline())["event"] == "status":
                ready = time.perf_counter() - t0
                c.sock.close()
                return proc, ready, sock
        except OSError:
            time.sleep(0.01)


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "mean": statistics.fmean(ordered),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="times each prompt is sent to each side")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md (+ .png)")
    ap.add_argument("--no-hog", action="store_true", help="skip the CPU hog comparison")
    args = ap.parse_args()
    origin = measured_by()  # at the start: the commit measured, not the tree --write leaves

    manifest = models.load_manifest()
    spec = manifest.get(manifest.default)
    model_file = models.fetch(spec)
    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_version

    print(
        f"model {spec.name}, n_ctx {args.n_ctx}, {args.threads} threads, "
        f"max_tokens {args.max_tokens}, {args.rounds} rounds x {len(PROMPTS)} prompts"
    )
    t0 = time.perf_counter()
    llm = Llama(model_path=str(model_file), n_ctx=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)  # fmt: skip
    raw_load = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        broker, port = (None, 0)
        if shutil.which("mosquitto"):
            broker, port = start_broker(Path(tmp))
        else:
            print("mosquitto not installed: skipping the MQTT path")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]
        proc, ready_s, sock = start_daemon(
            model_file, Path(tmp), args.n_ctx, f"threads = {args.threads}", port,
            http_port=http_port,
        )  # fmt: skip
        mq = None
        try:
            client = SocketClient(sock)
            web = HttpClient(http_port)
            sides = ["raw", "socket", "http"]
            raw_run(llm, "Hello", 4)  # warm-up, every side
            list(client.request({"id": "warm", "prompt": "Hello", "max_tokens": 4}))
            web.run("Hello", 4)
            if port:
                mq = MqttClient(port)
                mq.run("warm", "Hello", 4)
                sides.append("mqtt")
            results: dict[str, dict[str, list[float]]] = {
                side: {"ttft": [], "tps": []} for side in sides
            }
            for n, side, asked in schedule(args.rounds, sides):
                # Same KV-cache state on every side: the previous request each side saw is this
                # short one, and the question is new (schedule()).
                if side == "raw":
                    raw_run(llm, "Hello", 1)
                else:
                    daemon_hello(client, f"c{n}")
                if side == "raw":
                    ttft, tps, _ = raw_run(llm, asked, args.max_tokens)
                elif side == "socket":
                    ttft, tps, _ = daemon_run(client, f"b{n}", asked, args.max_tokens)
                elif side == "http":
                    ttft, tps, _ = web.run(asked, args.max_tokens)
                else:
                    assert mq is not None
                    ttft, tps, _ = mq.run(f"m{n}", asked, args.max_tokens)
                results[side]["ttft"].append(ttft * 1000)
                results[side]["tps"].append(tps)
            daemon_rss = psutil.Process(proc.pid).memory_info().rss
            raw_rss = psutil.Process().memory_info().rss
        finally:
            if mq is not None:
                mq.close()
            proc.terminate()
            proc.wait(30)
            if broker is not None:
                broker.terminate()
                broker.wait(10)
    del llm
    gc.collect()

    raw_t, sock_t = summarize(results["raw"]["ttft"]), summarize(results["socket"]["ttft"])
    raw_s, sock_s = summarize(results["raw"]["tps"]), summarize(results["socket"]["tps"])
    ttft_delta = sock_t["p50"] - raw_t["p50"]
    checks = [
        ("socket TTFT p50 within 5% (or 5 ms) of raw",
         ttft_delta <= max(0.05 * raw_t["p50"], 5.0),
         f"{sock_t['p50']:.1f} ms vs {raw_t['p50']:.1f} ms ({ttft_delta:+.1f} ms)"),
        ("socket tokens/s p50 at least 97% of raw",
         sock_s["p50"] >= 0.97 * raw_s["p50"],
         f"{sock_s['p50']:.1f} vs {raw_s['p50']:.1f} ({100 * sock_s['p50'] / raw_s['p50']:.1f}%)"),
        *path_checks(results, "mqtt", "MQTT", raw_t, raw_s),
        *path_checks(results, "http", "HTTP", raw_t, raw_s),
        ("daemon RSS under 750 MB", daemon_rss < 750e6, f"{daemon_rss / 1e6:.0f} MB"),
        ("start to ready under 2 s (model cached)", ready_s < 2.0, f"{ready_s:.2f} s"),
    ]  # fmt: skip
    # Date, command, commit and machine, then what ran: every table's section opens with it.
    stack = (
        f"{origin}; edgeagent {__version__}, llama-cpp-python {llama_version}; "
        f"model {spec.name}, n_ctx {args.n_ctx}"
    )
    lines = [
        f"{stack}, {args.threads} threads, greedy, max_tokens {args.max_tokens}; "
        f"{args.rounds} rounds x {len(PROMPTS)} prompts per side, order alternating.",
        "",
        "| path | TTFT p50 (ms) | TTFT p90 (ms) | tokens/s p50 | tokens/s mean |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| raw llama-cpp-python (in process) | {raw_t['p50']:.1f} | {raw_t['p90']:.1f} | "
        f"{raw_s['p50']:.1f} | {raw_s['mean']:.1f} |",
        f"| edgeagent over the Unix socket | {sock_t['p50']:.1f} | {sock_t['p90']:.1f} | "
        f"{sock_s['p50']:.1f} | {sock_s['mean']:.1f} |",
        *path_rows(results, "mqtt", "edgeagent over MQTT v5 (loopback mosquitto)"),
        *path_rows(results, "http", "edgeagent over HTTP (OpenAI API, SSE, loopback)"),
        "",
        f"Raw llama-cpp-python: load {raw_load:.2f} s; RSS of the benchmark process after the "
        f"runs {raw_rss / 1e6:.0f} MB (the daemon's, measured at the same point, is in the "
        "table below).",
        "",
        "| target | result | measured |",
        "| --- | --- | --- |",
        *(f"| {name} | {'pass' if ok else 'FAIL'} | {value} |" for name, ok, value in checks),
    ]
    hog_results: dict[str, dict[str, list[float]]] = {}
    if len(os.sched_getaffinity(0)) >= 2 and not args.no_hog:
        hog_lines, hog_results = hog_comparison(model_file, args, stack)
        lines += ["", *hog_lines]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_docs(report, results, hog_results)
    return 0 if all(ok for _, ok, _ in checks) else 1


HOG = "import time\nwhile True:\n    time.perf_counter()\n"


def hog_comparison(
    model_file: Path, args: argparse.Namespace, stack: str
) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Tokens/s beside a CPU hog: unpinned (threads on every core) vs pinned (a free core).

    The hog stands for line-control software that owns one core (pinned to it, as such
    software usually is). Unpinned, one of llama.cpp's threads shares the hog's core and
    every decode step waits for it; pinned, inference keeps to the other cores. The questions
    are new each time, as in main()'s comparison (schedule()). `stack` opens the section's
    text: where and with what it was measured.
    """
    allowed = sorted(os.sched_getaffinity(0))
    hog_core, rest = allowed[0], allowed[1:]
    configs = {
        "unpinned": f"cores = {allowed}\nio_cores = {allowed}\nthreads = {len(allowed)}",
        "pinned": f"cores = {rest}\nio_cores = [{hog_core}]\nthreads = {len(rest)}",
    }
    results: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tps": []} for k in configs}
    with tempfile.TemporaryDirectory(prefix="edgeagent-hog-") as tmp:
        daemons = {
            name: start_daemon(model_file, Path(tmp), args.n_ctx, cpu, 0, name)
            for name, cpu in configs.items()
        }
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        os.sched_setaffinity(hog.pid, {hog_core})
        try:
            clients = {name: SocketClient(d[2]) for name, d in daemons.items()}
            for n, name, asked in schedule(args.rounds, list(configs)):
                daemon_hello(clients[name], f"c{n}")
                ttft, tps, _ = daemon_run(clients[name], f"h{n}", asked, args.max_tokens)
                results[name]["ttft"].append(ttft * 1000)
                results[name]["tps"].append(tps)
        finally:
            hog.kill()
            hog.wait()
            for proc, _, _ in daemons.values():
                proc.terminate()
                proc.wait(30)
    un_t, pin_t = summarize(results["unpinned"]["ttft"]), summarize(results["pinned"]["ttft"])
    un_s, pin_s = summarize(results["unpinned"]["tps"]), summarize(results["pinned"]["tps"])
    lines = [
        f"{stack}, greedy, max_tokens {args.max_tokens}; {args.rounds} rounds x {len(PROMPTS)} "
        "prompts per placement, order alternating. With a CPU hog pinned to core "
        f"{hog_core} (a busy loop standing for line-control software), the same questions "
        "over the socket:",
        "",
        "| placement | TTFT p50 (ms) | tokens/s p50 | tokens/s mean |",
        "| --- | ---: | ---: | ---: |",
        f"| unpinned: {len(allowed)} threads on cores {allowed} | {un_t['p50']:.1f} | "
        f"{un_s['p50']:.1f} | {un_s['mean']:.1f} |",
        f"| pinned: {len(rest)} thread(s) on cores {rest}, I/O on core {hog_core} | "
        f"{pin_t['p50']:.1f} | {pin_s['p50']:.1f} | {pin_s['mean']:.1f} |",
        "",
        f"Pinned decodes {pin_s['p50'] / un_s['p50']:.1f}x as fast as unpinned beside the hog.",
        "",
        "These prompts are new each time, like the main table's: each question carries its own "
        "ticket number, so a daemon can reuse only the chat template's preamble and the TTFT "
        "here is a new prompt's, read beside the hog.",
    ]
    return lines, results


def path_rows(results: dict[str, dict[str, list[float]]], side: str, label: str) -> list[str]:
    if side not in results:
        return []
    t, r = summarize(results[side]["ttft"]), summarize(results[side]["tps"])
    return [f"| {label} | {t['p50']:.1f} | {t['p90']:.1f} | {r['p50']:.1f} | {r['mean']:.1f} |"]


def path_checks(
    results: dict[str, dict[str, list[float]]], side: str, name: str,
    raw_t: dict[str, float], raw_s: dict[str, float],
) -> list[tuple[str, bool, str]]:  # fmt: skip
    """The targets of a network path (MQTT, HTTP): TTFT within 10 ms of raw, 97% of its rate."""
    if side not in results:
        return []
    t, r = summarize(results[side]["ttft"]), summarize(results[side]["tps"])
    delta = t["p50"] - raw_t["p50"]
    return [
        (f"{name} TTFT p50 within 10 ms of raw", delta <= 10.0,
         f"{t['p50']:.1f} ms vs {raw_t['p50']:.1f} ms ({delta:+.1f} ms)"),
        (f"{name} tokens/s p50 at least 97% of raw", r["p50"] >= 0.97 * raw_s["p50"],
         f"{r['p50']:.1f} vs {raw_s['p50']:.1f} ({100 * r['p50'] / raw_s['p50']:.1f}%)"),
    ]  # fmt: skip


def write_docs(
    report: str,
    results: dict[str, dict[str, list[float]]],
    hog_results: dict[str, dict[str, list[float]]],
) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.write_text(f"{head}{MARK_BEGIN}\n{report}\n{MARK_END}{tail}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = 3 if hog_results else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    ax1, ax2 = axes[0], axes[1]
    names = {"raw": "raw llama-cpp-python", "socket": "edgeagent socket", "mqtt": "edgeagent MQTT",
             "http": "edgeagent HTTP"}  # fmt: skip
    labels = [names[side] for side in results]
    ax1.boxplot([v["ttft"] for v in results.values()], tick_labels=labels)
    ax1.set_title("time to first token (ms)")
    ax2.boxplot([v["tps"] for v in results.values()], tick_labels=labels)
    ax2.set_title("decode tokens/s")
    if hog_results:
        ax3 = axes[2]
        ax3.boxplot([v["tps"] for v in hog_results.values()], tick_labels=list(hog_results))
        ax3.set_title("tokens/s beside a CPU hog")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "benchmarks.png", dpi=110)
    print(f"wrote {doc} and docs/benchmarks.png")


if __name__ == "__main__":
    sys.exit(main())
