#!/usr/bin/env python3
"""Benchmark concurrent clients: edgeagent against llama-cpp-python's server and llama-server.

In one run on the same box, each server is started in turn with the same model, thread count,
slots and per-slot context, and driven by 1, 2, 4 and 8 clients at once, each client sending
its requests one after the other (streaming, greedy). Reports aggregate tokens/s (all tokens
over the phase's wall time), per-client tokens/s (each request's decode rate as its client saw
it), TTFT p50/p95 and the server's peak RSS. Then a restart experiment: time to first token of
the first request after a daemon restart with a 1,000-token system prompt (its KV snapshot on
disk) against the same with no system prompt.

    make bench                                   # both benchmark scripts, print only
    .venv/bin/python scripts/bench_concurrency.py --write   # update docs/benchmarks.md + png
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeagent import __version__, models
from tests.reliability import measured_by

MARK_BEGIN = "<!-- concurrency:begin -->"
MARK_END = "<!-- concurrency:end -->"
TOPICS = [
    "a conveyor belt drifting to one side",
    "a pneumatic cylinder moving slower than usual",
    "a motor overheating at low supply voltage",
    "a packaging sealer leaving weak seals",
    "a hydraulic press losing pressure",
    "a barcode scanner missing labels",
    "a robot arm stopping with a position error",
    "a chiller alarming on high discharge pressure",
]
QUESTION = "List the likely causes of {} and the first check for each."
EDGEAGENT = "edgeagent"
EDGEAGENT_FAST = "edgeagent-fast"  # [engine] batch_invariant = false
# The batch-invariant engine with prompt text through the tiled matmul, steps split by role
# (GGML_CPU_TILED_MM=1; the default is row by row, one call per step).
EDGEAGENT_ROLES = "edgeagent-roles"
STEP_STREAMS = (1, 2, 4, 8)


@dataclass
class Request:
    client: int
    sent: float
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0
    evaluated: int = -1  # prompt tokens the server evaluated (edgeagent and llama-server say)

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.sent) * 1000

    @property
    def decode_tps(self) -> float:
        span = self.end - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


@dataclass
class Phase:
    clients: int
    fresh: bool = False  # every question new (no server can reuse more than the template)
    requests: list[Request] = field(default_factory=list)
    wall_s: float = 0.0
    rss_peak: int = 0

    def aggregate_tps(self) -> float:
        return sum(r.tokens for r in self.requests) / self.wall_s

    def per_client_tps(self) -> float:
        return statistics.fmean(r.decode_tps for r in self.requests)

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft_ms for r in self.requests)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def evaluated(self) -> str:
        """Prompt tokens the server evaluated per request (where it says)."""
        if not all(r.evaluated >= 0 for r in self.requests):
            return "-"
        return f"{statistics.fmean(r.evaluated for r in self.requests):.0f}"

    @property
    def label(self) -> str:
        return f"{self.clients}, all new" if self.fresh else str(self.clients)


# --- clients ------------------------------------------------------------------------------


def stream_socket(
    path: str, prompt: str, max_tokens: int, system: str = ""
) -> Iterator[dict[str, Any]]:
    """One request to edgeagent over its Unix socket; yields its events."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        f = s.makefile("rb")
        req = {"id": "q", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        s.sendall(json.dumps(req).encode() + b"\n")
        while True:
            event = json.loads(f.readline())
            yield event
            if event["event"] == "error":
                raise RuntimeError(event)
            if event["event"] == "done":
                return


def run_socket(path: str) -> Callable[[str, int, Request], None]:
    def run(prompt: str, max_tokens: int, r: Request) -> None:
        for event in stream_socket(path, prompt, max_tokens):
            if event["event"] == "token" and not r.first:
                r.first = time.perf_counter()
            if event["event"] == "done":
                r.end = time.perf_counter()
                r.tokens = event["usage"]["completion_tokens"]
                r.evaluated = event["usage"]["evaluated_tokens"]

    return run


def client_keys(workdir: Path) -> tuple[Path, list[str]]:
    """An API keys file with one key per benchmark client: each client is its own identity,
    as kiosks with keys are (without keys every loopback client is one, and one identity
    may hold all slots but one); llama-server ignores the header."""
    keys = [f"bench-client-{c:02d}-{os.urandom(8).hex()}" for c in range(64)]
    path = workdir / "http-api-keys"
    path.write_text("".join(f"client-{c}: {key}\n" for c, key in enumerate(keys)))
    path.chmod(0o600)
    return path, keys


def run_openai(port: int, keys: list[str] | None = None) -> Callable[[str, int, Request], None]:
    """A streaming chat completion over HTTP, the same for every server: TTFT at the first
    content chunk, tokens from the usage chunk (content chunks counted where a server sends
    none), prompt tokens evaluated from llama-server's `timings.prompt_n` or from the usage's
    prompt tokens less `prompt_tokens_details.cached_tokens`."""

    def run(prompt: str, max_tokens: int, r: Request) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Content-Type": "application/json"}
        if keys:
            headers["Authorization"] = f"Bearer {keys[r.client % len(keys)]}"
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        n = counted = 0
        last = b""
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            last = data
            chunk = json.loads(data)
            timings = chunk.get("timings")  # llama-server: prompt tokens it evaluated
            if isinstance(timings, dict) and "prompt_n" in timings:
                r.evaluated = int(timings["prompt_n"])
            usage = chunk.get("usage")
            if isinstance(usage, dict) and "completion_tokens" in usage:
                counted = int(usage["completion_tokens"])
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                if cached is not None and r.evaluated < 0:
                    r.evaluated = int(usage["prompt_tokens"]) - int(cached)
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                n += 1
                if not r.first:
                    r.first = time.perf_counter()
        r.end = time.perf_counter()
        if not n:
            raise RuntimeError(f"the stream ended without a token; last event {last[:300]!r}")
        r.tokens = counted or n
        conn.close()

    return run


def drive(
    run: Callable[[str, int, Request], None],
    clients: int,
    per_client: int,
    max_tokens: int,
    pid: int,
    fresh: bool = False,
) -> Phase:
    """`clients` threads, each sending `per_client` requests back to back: the 8 questions in
    turn (as terminals on a line ask the same things again), or with `fresh` each one new."""
    phase = Phase(clients, fresh)
    lock = threading.Lock()
    errors: list[BaseException] = []
    proc = psutil.Process(pid)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                phase.rss_peak = max(phase.rss_peak, rss)
            stop.wait(0.2)

    def client(c: int) -> None:
        try:
            for k in range(per_client):
                topic = TOPICS[(c * per_client + k) % len(TOPICS)]
                question = QUESTION.format(topic)
                if fresh:
                    question = f"Ticket {1000 + c * per_client + k}: {question}"
                r = Request(client=c, sent=time.perf_counter())
                run(question, max_tokens, r)
                with lock:
                    phase.requests.append(r)
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return phase


# --- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def daemon_config(
    workdir: Path,
    name: str,
    model_file: Path,
    *,
    n_ctx: int,
    threads: int,
    parallel: int,
    system: str = "",
    prefix_dir: str = "",
    batch_invariant: bool = True,
    http_port: int = 0,
    keys_file: Path | None = None,
) -> tuple[Path, str]:
    """The daemon's config and socket path; HTTP on 127.0.0.1:`http_port` with the clients'
    keys, off without a port."""
    sock = str(workdir / f"{name}.sock")
    cfg = workdir / f"{name}.toml"
    system_line = f"system_prompt = {json.dumps(system)}\n" if system else ""
    http = "enabled = false"
    if http_port:
        http = f'listen = "127.0.0.1:{http_port}"\napi_keys_file = "{keys_file or ""}"'
    cfg.write_text(
        f'node_id = "bench"\n[model]\npath = "{model_file}"\nn_ctx = {n_ctx}\n{system_line}'
        f"[cpu]\nthreads = {threads}\n[engine]\nparallel = {parallel}\nqueue_size = 64\n"
        f"batch_invariant = {str(batch_invariant).lower()}\n"
        f'prefix_cache_dir = "{prefix_dir or workdir / "prefix"}"\n'
        f'[socket]\npath = "{sock}"\n[http]\n{http}\n[log]\nlevel = "warning"\n'
    )
    return cfg, sock


def start_daemon(
    workdir: Path, cfg: Path, sock: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Start `edgeagent run`; return it and the seconds it took to answer `status`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)], cwd=workdir,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock)
                s.sendall(b'{"op": "status"}\n')
                if json.loads(s.makefile("rb").readline())["event"] == "status":
                    return proc, time.perf_counter() - t0
        except (OSError, ValueError):
            time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def build_llama_tool(tool: str = "llama-server") -> str | None:
    """The path of llama.cpp's `tool` (llama-server or llama-bench), built once per box."""
    script = ROOT / "scripts" / "build-llama-server.sh"
    if not script.exists():
        return None
    version = subprocess.check_output(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"], text=True
    ).strip()
    try:
        out = subprocess.run([str(script), version, sys.executable, tool], check=True,
                             capture_output=True, text=True)  # fmt: skip
    except subprocess.CalledProcessError as exc:
        print(f"{tool} could not be built here:\n{exc.stderr[-2000:]}")
        return None
    return out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def server(
    kind: str, model_file: Path, workdir: Path, args: argparse.Namespace, llama_server: str | None
) -> Iterator[tuple[Callable[[str, int, Request], None], int]]:
    if kind in (EDGEAGENT, EDGEAGENT_FAST, EDGEAGENT_ROLES):
        port = free_port() if args.edgeagent_over == "http" else 0
        keys_file, keys = client_keys(workdir)
        cfg, sock = daemon_config(
            workdir,
            "conc",
            model_file,
            n_ctx=args.n_ctx,
            threads=args.threads,
            parallel=args.slots,
            batch_invariant=kind != EDGEAGENT_FAST,
            http_port=port,
            keys_file=keys_file,
        )
        roles = {"GGML_CPU_TILED_MM": "1"} if kind == EDGEAGENT_ROLES else None
        proc, _ = start_daemon(workdir, cfg, sock, roles)
        run = run_openai(port, keys) if port else run_socket(sock)
    elif kind == "llama_cpp.server":
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model_file),
                "--n_ctx",
                str(args.n_ctx),
                "--n_threads",
                str(args.threads),
                "--n_threads_batch",
                str(args.threads),
                # Its default lets a new request cut off the one streaming; here they queue.
                "--interrupt_requests",
                "False",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(proc, port, "/v1/models")
        run = run_openai(port, client_keys(workdir)[1])
    else:
        assert llama_server is not None
        port = free_port()
        proc = subprocess.Popen(
            [
                llama_server,
                "-m",
                str(model_file),
                "-np",
                str(args.slots),
                "-c",
                str(args.n_ctx * args.slots),
                "-t",
                str(args.threads),
                "-tb",
                str(args.threads),
                "--no-kv-unified",  # n_ctx per slot, as on the other servers
                "--no-webui",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(proc, port, "/health")
        run = run_openai(port, client_keys(workdir)[1])
    try:
        yield run, proc.pid
    finally:
        stop(proc)


# --- what one decode step costs on this box -----------------------------------------------


def step_costs(model_file: Path, args: argparse.Namespace, invariant: bool) -> dict[int, float]:
    """Median ms of one engine step that gives n sequences one token each (n outputs).

    Runs in a child process: llama.cpp's batch API through edgeagent.decoder, nothing else on
    the box busy. This is the ceiling batching works under: n streams can decode at most
    n * 1000 / ms tokens/s.
    """
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from edgeagent.decoder import BatchDecoder
dec = BatchDecoder(Path({str(model_file)!r}), n_ctx={args.n_ctx}, n_slots={max(STEP_STREAMS)},
                   n_batch=512, n_threads={args.threads}, batch_invariant={invariant})
prompt = dec.tokenize("List the likely causes of a hydraulic press losing pressure.", special=True)
for slot in dec.slots:
    slot.pending, slot.written = list(prompt), [False] * len(prompt)
    for _ in dec.steps([], [(slot, len(prompt), True)]):
        pass
out = {{}}
for n in {STEP_STREAMS!r}:
    times = []
    for _ in range(15):
        for slot in dec.slots[:n]:
            dec.truncate(slot, len(prompt))
        t = time.perf_counter()
        for _ in dec.steps([(slot, prompt[0]) for slot in dec.slots[:n]], []):
            pass  # the engine's calls: with batch invariance, at most 7 rows each
        times.append(time.perf_counter() - t)
    out[n] = round(1000 * sorted(times)[len(times) // 2], 1)
print(json.dumps(out))
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}


# --- restart with a long system prompt -------------------------------------------------------


def station_manual(words: int) -> str:
    """A long fixed system prompt of the kind stations carry (rules, limits, contacts)."""
    parts = ["You are the assistant of assembly station 14. Follow the station rules below."]
    n = 1
    while sum(len(p.split()) for p in parts) < words:
        parts.append(
            f"Rule {n}: before opening guard {n % 7 + 1}, press the stop button on panel "
            f"{n % 5 + 1}, wait {n % 4 + 2} seconds for the spindle to halt, lock out breaker "
            f"Q{n + 10} and log the reason in the shift book; torque limit for fixture F{n} is "
            f"{20 + n % 13} Nm."
        )
        n += 1
    return "\n".join(parts)


def first_ttft(
    workdir: Path,
    model_file: Path,
    args: argparse.Namespace,
    name: str,
    system: str,
    prefix_dir: str,
) -> tuple[float, float, dict[str, Any]]:
    """Start a daemon, send one request, stop it: (ready_s, ttft_ms, done event)."""
    cfg, sock = daemon_config(
        workdir,
        name,
        model_file,
        n_ctx=args.n_ctx_system,
        threads=args.threads,
        parallel=args.slots,
        system=system,
        prefix_dir=prefix_dir,
    )
    proc, ready = start_daemon(workdir, cfg, sock)
    try:
        t0 = time.perf_counter()
        first = 0.0
        done: dict[str, Any] = {}
        for event in stream_socket(sock, QUESTION.format(TOPICS[0]), 8):
            if event["event"] == "token" and not first:
                first = time.perf_counter()
            if event["event"] == "done":
                done = event
    finally:
        stop(proc)
    return ready, (first - t0) * 1000, done


def restart_experiment(model_file: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    manual = station_manual(args.system_words)
    prefix_dir = str(workdir / "restart-prefix")
    results: dict[str, Any] = {}
    rows = {"none": [], "snapshot": [], "cold": [], "off": []}  # type: dict[str, list[tuple[float, float, dict[str, Any]]]]
    for i in range(args.restarts):
        rows["none"].append(first_ttft(workdir, model_file, args, f"none{i}", "", prefix_dir))
        shutil.rmtree(prefix_dir, ignore_errors=True)
        rows["cold"].append(first_ttft(workdir, model_file, args, f"cold{i}", manual, prefix_dir))
        rows["snapshot"].append(
            first_ttft(workdir, model_file, args, f"snap{i}", manual, prefix_dir)
        )
        rows["off"].append(first_ttft(workdir, model_file, args, f"off{i}", manual, "off"))
    for key, values in rows.items():
        results[key] = {
            "ready_s": statistics.median(v[0] for v in values),
            "ttft_ms": statistics.median(v[1] for v in values),
            "prompt_tokens": values[0][2]["usage"]["prompt_tokens"],
            "evaluated_tokens": values[0][2]["usage"]["evaluated_tokens"],
            "cache": values[0][2]["usage"]["cache"],
            "prompt_ms": statistics.median(v[2]["timings"]["prompt_ms"] for v in values),
        }
    return results


# --- report -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--slots", type=int, default=8, help="parallel slots on every server")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument(
        "--fresh-clients", default="4", help="client counts also run with every question new"
    )
    ap.add_argument("--per-client", type=int, default=6, help="requests each client sends")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--servers", default=f"{EDGEAGENT},{EDGEAGENT_FAST},llama-server,llama_cpp.server"
    )
    ap.add_argument("--system-words", type=int, default=700, help="~1,000 tokens")
    ap.add_argument("--n-ctx-system", type=int, default=2048)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument(
        "--edgeagent-over",
        choices=("http", "socket"),
        default="http",
        help="http: every server is driven by the same OpenAI streaming client (default); "
        "socket: edgeagent by its JSON-lines socket, with HTTP off",
    )
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md (+ png)")
    args = ap.parse_args()
    origin = measured_by()  # at the start: the commit measured, not the tree --write leaves

    spec = models.load_manifest().get(models.load_manifest().default)
    model_file = models.fetch(spec)
    counts = [int(c) for c in args.clients.split(",")]
    fresh_counts = [int(c) for c in args.fresh_clients.split(",") if c]
    kinds = args.servers.split(",")
    llama_server = build_llama_tool() if "llama-server" in kinds else None
    if llama_server is None and "llama-server" in kinds:
        kinds.remove("llama-server")
    results: dict[str, list[Phase]] = {}
    steps = {
        label: step_costs(model_file, args, invariant)
        for label, invariant in (("batch-invariant kernels", True), ("fastest kernels", False))
    }
    print("decode step (ms) by streams:", steps, flush=True)
    import bench_prompt

    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        reading = bench_prompt.reading(
            model_file, Path(tmp), args.threads, build_llama_tool("llama-bench")
        )
        try:
            long_prompt = bench_prompt.long_prompt_under_load(model_file, Path(tmp), args.threads)
        except Exception as exc:  # reported in the table's place; the rest of the run stands
            print(f"long prompt under load failed: {exc!r}", flush=True)
            long_prompt = None
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        workdir = Path(tmp)
        for kind in kinds:
            with server(kind, model_file, workdir, args, llama_server) as (run, pid):
                drive(run, 1, 1, 4, pid)  # warm-up
                results[kind] = []
                runs = [(n, False) for n in counts] + [(n, True) for n in fresh_counts]
                for n, fresh in runs:
                    phase = drive(run, n, args.per_client, args.max_tokens, pid, fresh)
                    results[kind].append(phase)
                    print(
                        f"{kind:18} {phase.label} clients: {phase.aggregate_tps():6.1f} tok/s "
                        f"aggregate, {phase.per_client_tps():5.1f} per client, TTFT p50 "
                        f"{phase.ttft(0.5):6.0f} ms p95 {phase.ttft(0.95):6.0f} ms, "
                        f"RSS {phase.rss_peak / 1e6:.0f} MB, prompt tokens evaluated per "
                        f"request {phase.evaluated()}",
                        flush=True,
                    )
        restart = restart_experiment(model_file, workdir, args)
    report, checks = render(
        results, restart, steps, args, llama_server is not None, origin, spec.name,
        (reading, long_prompt),
    )  # fmt: skip
    print(report)
    if args.write:
        write_docs(report, results)
    return 0 if all(ok for _, ok, _ in checks) else 1


def render(
    results: dict[str, list[Phase]],
    restart: dict[str, Any],
    steps: dict[str, dict[int, float]],
    args: argparse.Namespace,
    have_llama_server: bool,
    origin: str,
    model: str,
    prompt_phase: tuple[dict[str, Any], dict[str, Any] | None] | None = None,
) -> tuple[str, list[tuple[str, bool, str]]]:
    """The report; `origin` is measured_by()'s opening (date, command, commit, machine), which
    every table's section repeats with what ran."""
    import llama_cpp

    stack = (
        f"{origin}; edgeagent {__version__}, llama-cpp-python {llama_cpp.__version__}; "
        f"model {model}, {args.threads} threads"
    )
    lines = [
        f"{stack}, {args.slots} slots of n_ctx "
        f"{args.n_ctx} on every server, greedy, max_tokens {args.max_tokens}, each client sends "
        f"{args.per_client} requests back to back, "
        + (
            "every server driven by the same client code: streamed OpenAI chat completions "
            "over HTTP, each client with its own API key (edgeagent with its HTTP front end "
            "on, as it ships; each key is a client of its own there). "
            if args.edgeagent_over == "http"
            else "edgeagent over its Unix socket with HTTP off, the others over HTTP. "
        )
        + f"The questions are {len(TOPICS)} "
        f"troubleshooting questions in turn, so servers that keep earlier prompts' cells "
        f"reuse them; in the rows marked *all new* every question starts differently "
        f'("Ticket 1003: ..."), so only the chat template can be reused. *Evaluated* is the '
        f"prompt tokens the server computed per request (llama_cpp.server does not say).",
        "",
        "| server | clients | aggregate tok/s | per-client tok/s | TTFT p50 (ms) | "
        "TTFT p95 (ms) | peak RSS (MB) | evaluated |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, phases in results.items():
        for p in phases:
            lines.append(
                f"| {kind} | {p.label} | {p.aggregate_tps():.1f} | {p.per_client_tps():.1f} | "
                f"{p.ttft(0.5):.0f} | {p.ttft(0.95):.0f} | {p.rss_peak / 1e6:.0f} | "
                f"{p.evaluated()} |"
            )
    lines += [
        "",
        f"{stack}, n_ctx {args.n_ctx} per sequence. "
        "What one decode step costs here: one engine step giving n sequences one token "
        "each (median of 15, nothing else running); n streams can decode at most "
        "n x 1000 / ms tokens/s, which caps what any server can gain from batching on this "
        "box.",
        "",
        "| kernels | "
        + " | ".join(f"{n} stream{'s' if n > 1 else ''} (ms)" for n in STEP_STREAMS)
        + " | ceiling at 4 vs 1 |",
        "| --- | " + " | ".join("---:" for _ in STEP_STREAMS) + " | ---: |",
        *(
            f"| {label} | "
            + " | ".join(f"{ms[n]:.1f}" for n in STEP_STREAMS)
            + f" | {4 * ms[1] / ms[4]:.2f}x |"
            for label, ms in steps.items()
        ),
    ]
    checks: list[tuple[str, bool, str]] = []
    if prompt_phase is not None:
        import bench_prompt

        more, prompt_checks = bench_prompt.render(*prompt_phase, stack, args.threads)
        lines += ["", *more]
        checks += prompt_checks
    by = {kind: {p.clients: p for p in phases if not p.fresh} for kind, phases in results.items()}
    new = {kind: {p.clients: p for p in phases if p.fresh} for kind, phases in results.items()}
    ea = by.get("edgeagent", {})
    if 1 in ea and 4 in ea:
        one, four = ea[1], ea[4]
        ratio = four.aggregate_tps() / one.aggregate_tps()
        checks.append(
            (
                "4 clients: aggregate tok/s at least 1.6x single-client",
                ratio >= 1.6,
                f"{four.aggregate_tps():.1f} vs {one.aggregate_tps():.1f} ({ratio:.2f}x)",
            )
        )
        for table, what in ((by, ""), (new, ", every question new")):
            mine, theirs = table["edgeagent"].get(4), table.get("llama-server", {}).get(4)
            if have_llama_server and mine is not None and theirs is not None:
                checks.append(
                    (
                        f"4 clients{what}: aggregate tok/s at least llama-server's",
                        mine.aggregate_tps() >= theirs.aggregate_tps(),
                        f"{mine.aggregate_tps():.1f} vs {theirs.aggregate_tps():.1f}",
                    )
                )
        t_ratio = four.ttft(0.95) / one.ttft(0.95)
        checks.append(
            (
                "4 clients: TTFT p95 at most 2.5x single-client",
                t_ratio <= 2.5,
                f"{four.ttft(0.95):.0f} ms vs {one.ttft(0.95):.0f} ms ({t_ratio:.2f}x)",
            )
        )
    none, snap = restart["none"], restart["snapshot"]
    r = snap["ttft_ms"] / none["ttft_ms"]
    checks.append(
        (
            "first request after restart, 1,000-token system prompt: TTFT within 1.3x "
            "of no system prompt",
            r <= 1.3,
            f"{snap['ttft_ms']:.0f} ms vs {none['ttft_ms']:.0f} ms ({r:.2f}x)",
        )
    )
    names = {
        "none": "no system prompt",
        "snapshot": "system prompt, snapshot on disk from an earlier run",
        "cold": "system prompt, no snapshot yet (computed while starting)",
        "off": "system prompt, prefix cache off",
    }
    lines += [
        "",
        f"{stack}, {args.slots} slots of n_ctx {args.n_ctx_system}, greedy, max_tokens 8. "
        f"First request after a restart (median of {args.restarts} restarts):",
        "",
        "| daemon | start to ready (s) | TTFT (ms) | prompt_ms in done | prompt tokens | "
        "evaluated | usage.cache |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        *(
            f"| {names[k]} | {v['ready_s']:.2f} | {v['ttft_ms']:.0f} | {v['prompt_ms']:.0f} | "
            f"{v['prompt_tokens']} | "
            f"{v['evaluated_tokens']} | {v['cache']} |"
            for k, v in restart.items()
        ),
        "",
        "| target | result | measured |",
        "| --- | --- | --- |",
        *(f"| {name} | {'pass' if ok else 'FAIL'} | {value} |" for name, ok, value in checks),
    ]
    return "\n".join(lines), checks


def write_docs(report: str, results: dict[str, list[Phase]]) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    if MARK_BEGIN not in text:
        text += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    figure = "![tokens/s and TTFT p95 by number of clients](benchmarks-concurrency.png)"
    doc.write_text(f"{head}{MARK_BEGIN}\n{report}\n\n{figure}\n{MARK_END}{tail}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for kind, every in results.items():
        phases = [p for p in every if not p.fresh]
        xs = [p.clients for p in phases]
        axes[0].plot(xs, [p.aggregate_tps() for p in phases], marker="o", label=kind)
        axes[1].plot(xs, [p.per_client_tps() for p in phases], marker="o", label=kind)
        axes[2].plot(xs, [p.ttft(0.95) for p in phases], marker="o", label=kind)
    titles = ["aggregate tokens/s", "per-client tokens/s", "TTFT p95 (ms)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "benchmarks-concurrency.png", dpi=110)
    print(f"wrote {doc} and docs/benchmarks-concurrency.png")


if __name__ == "__main__":
    sys.exit(main())
