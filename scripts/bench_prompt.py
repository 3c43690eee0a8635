#!/usr/bin/env python3
"""Prompt reading against llama.cpp's own limit, and a long prompt arriving under load.

Part of `scripts/bench_concurrency.py`'s run (so the figures share its box, commit and
minute); runs alone too, printing only:

    .venv/bin/python scripts/bench_prompt.py

1. llama.cpp's `llama-bench` (built from the wheel's sources and CPU flags, like llama-server)
   reads 128- and 512-token prompts and decodes 64 tokens with the daemon's thread count; a
   real `edgeagent run` daemon reads new prompts of about 128, 512 and 1,500 tokens, one at a
   time, and says in each `done` how long the prompt took (`timings.prompt_ms`) and how many
   tokens it evaluated. Both with each kernel choice: the daemon's default (batch-invariant:
   no flash attention, no repacked weights, no tiled K-quant matmul; see edgeagent/decoder.py)
   and llama.cpp's own defaults (what `[engine] batch_invariant = false` selects). In ABBA
   order per kernel choice (llama-bench, daemon, daemon, llama-bench), because this kind of
   VM drifts by several percent within minutes. With the default, both run the same kernels
   (llama-bench: `-fa off --repack 0`, and GGML_CPU_TILED_MM=0 unless the run sets it: with
   GGML_CPU_TILED_MM=1, llama-bench's pp rows are prompt text, its tg rows one row at a time,
   as the daemon reads and decodes them).
2. Three clients stream long answers; a new ~1,200-token prompt arrives. Its time to first
   token against the same prompt's alone, and the streams' longest gap between tokens while it
   is read against their usual gap and the time of one step with a prompt chunk.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_concurrency import (
    daemon_config,
    start_daemon,
    station_manual,
    stop,
    stream_socket,
)

from edgeagent.engine import auto_parallel

LENGTHS = (128, 512, 1500)  # the daemon's prompts, in evaluated tokens (about)
BENCH_LENGTHS = (128, 512)  # llama-bench's
N_GEN = 64
N_CTX = 2048  # per slot: room for the 1,500-token prompt
# (label, batch_invariant)
KERNELS = (
    ("batch-invariant (default)", True),
    ("llama.cpp's defaults (batch_invariant = false)", False),
)


def llama_bench(binary: str, model_file: Path, threads: int, invariant: bool,
                reps: int = 3) -> dict[str, float]:  # fmt: skip
    """llama-bench's tokens/s for pp128, pp512 and tg64 with one kernel choice."""
    args = [binary, "-m", str(model_file), "-t", str(threads), "-r", str(reps), "-o", "jsonl",
            "-p", ",".join(map(str, BENCH_LENGTHS)), "-n", str(N_GEN)]  # fmt: skip
    env = dict(os.environ)
    if invariant:
        # The kernels edgeagent.decoder picks for batch_invariant = true (by default), with
        # the daemon's GGML_CPU_TILED_MM if this run sets one.
        args += ["-fa", "off", "--repack", "0"]
        env.setdefault("GGML_CPU_TILED_MM", "0")
    else:
        env = {k: v for k, v in env.items() if not k.startswith("GGML_CPU_TILED_MM")}
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True, timeout=900)
    rates = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        rates[name] = float(row["avg_ts"])
    return rates


def texts(model_file: Path) -> dict[int, str]:
    """A text of about n tokens for each daemon length (cut from the station manual)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(station_manual(2000).encode(), add_bos=False)
    overhead = 20  # the chat template around a user message, less what the daemon reuses
    return {n: vocab.detokenize(tokens[: n - overhead]).decode("utf-8", "replace") for n in LENGTHS}


def daemon_rates(
    model_file: Path, workdir: Path, threads: int, invariant: bool,
    prompts: dict[int, str], reps: int = 3,
) -> dict[int, tuple[float, int]]:  # fmt: skip
    """The daemon's prompt tokens/s (median of `reps`) and tokens evaluated, by length."""
    name = f"read-{'inv' if invariant else 'fast'}-{time.monotonic_ns()}"
    cfg, sock = daemon_config(
        workdir, name, model_file, n_ctx=N_CTX, threads=threads,
        parallel=auto_parallel(threads, N_CTX), batch_invariant=invariant,
    )  # fmt: skip
    proc, _ready = start_daemon(workdir, cfg, sock)
    seq = 0

    def read(text: str) -> tuple[float, int]:
        nonlocal seq
        seq += 1  # a new start each time: nothing beyond the template is in any cache
        for event in stream_socket(sock, f"Ticket {seq}{os.getpid()}: {text}", 1):
            if event["event"] == "done":
                n = int(event["usage"]["evaluated_tokens"])
                return n / (event["timings"]["prompt_ms"] / 1000), n
        raise RuntimeError("no done event")

    try:
        read(prompts[LENGTHS[0]])  # warm-up
        out = {}
        for n, text in prompts.items():
            runs = [read(text) for _ in range(reps)]
            out[n] = (statistics.median(r[0] for r in runs), runs[0][1])
        return out
    finally:
        stop(proc)


def reading(model_file: Path, workdir: Path, threads: int, binary: str | None) -> dict[str, Any]:
    """Part 1: {label: {"llama-bench": {...}, "daemon": {n: (tok/s, evaluated)}}}."""
    prompts = texts(model_file)
    results: dict[str, Any] = {}
    for label, invariant in KERNELS:
        benches: list[dict[str, float]] = []
        daemons: list[dict[int, tuple[float, int]]] = []
        for turn in ("bench", "daemon", "daemon", "bench"):  # ABBA
            last: Any
            if turn == "bench":
                if not binary:
                    continue
                last = llama_bench(binary, model_file, threads, invariant)
                benches.append(last)
            else:
                last = daemon_rates(model_file, workdir, threads, invariant, prompts)
                daemons.append(last)
            print(f"prompt reading, {label}: {turn} {last}", flush=True)
        results[label] = {
            "llama-bench": {k: statistics.fmean(b[k] for b in benches) for k in benches[0]}
            if benches
            else {},
            "daemon": {
                n: (statistics.fmean(d[n][0] for d in daemons), daemons[0][n][1]) for n in LENGTHS
            },
        }
    return results


def long_prompt_under_load(model_file: Path, workdir: Path, threads: int,
                           streams: int = 3, reps: int = 2) -> dict[str, Any]:  # fmt: skip
    """Part 2, with the default kernels and prefill_chunk."""
    prompt = texts(model_file)[LENGTHS[-1]]
    prompt = prompt[: len(prompt) * 4 // 5]  # about 1,200 tokens
    cfg, sock = daemon_config(
        workdir, f"long-{time.monotonic_ns()}", model_file, n_ctx=N_CTX, threads=threads,
        parallel=max(streams + 1, auto_parallel(threads, N_CTX)),
    )  # fmt: skip
    proc, _ready = start_daemon(workdir, cfg, sock)
    seqs = iter(range(1, 1 << 30))  # next() is atomic: the stream threads share it

    def ask(max_tokens: int, text: str, stamps: list[float]) -> dict[str, Any]:
        seq = next(seqs)
        t0 = time.perf_counter()
        stamps.append(t0)
        for event in stream_socket(sock, f"Ticket {seq}: {text}", max_tokens):
            if event["event"] == "token":
                stamps.append(time.perf_counter())
            if event["event"] == "done":
                return event
        raise RuntimeError("no done event")

    def stream(ticks: list[list[float]], stop_at: threading.Event) -> None:
        """Long answers one after another until `stop_at`; each answer's token times apart
        (a greedy answer may end early: the next one starts)."""
        while not stop_at.is_set():
            ticks.append([])
            ask(400, "Describe, step by step and at length, how to commission a new conveyor "
                "line.", ticks[-1])  # fmt: skip

    try:
        ask(1, "warm up", [])
        solo, loaded, gaps, usual, chunk_steps = [], [], [], [], []
        for _ in range(reps):
            solo.append(ask(1, prompt, [])["timings"]["ttft_ms"])
            lines: list[list[list[float]]] = [[] for _ in range(streams)]
            stop_at = threading.Event()
            workers = [threading.Thread(target=stream, args=(lines[i], stop_at), daemon=True)
                       for i in range(streams)]  # fmt: skip
            for w in workers:
                w.start()
            deadline = time.monotonic() + 120
            while min(sum(len(t) for t in x) for x in lines) < 20:  # all decoding
                if not all(w.is_alive() for w in workers) or time.monotonic() > deadline:
                    raise RuntimeError("the streams did not all start")
                time.sleep(0.05)
            mine: list[float] = []
            done = ask(1, prompt, mine)
            stop_at.set()
            for w in workers:
                w.join()
            loaded.append(done["timings"]["ttft_ms"])
            start = mine[0]
            first = start + done["timings"]["ttft_ms"] / 1000
            for x in lines:
                pairs = [(a, b) for t in x for a, b in zip(t[1:], t[2:])]  # t[0]: sent
                during = [b - a for a, b in pairs if b > start and a < first]
                before = [b - a for a, b in pairs if b <= start]
                gaps.append(max(during, default=0.0) * 1000)
                usual.append(statistics.median(before) * 1000)
            n = int(done["usage"]["evaluated_tokens"])
            chunks = -(-n // 128)
            chunk_steps.append(done["timings"]["prompt_ms"] / chunks)
        return {
            "streams": streams,
            "tokens": n,
            "solo_ttft_ms": statistics.median(solo),
            "loaded_ttft_ms": statistics.median(loaded),
            "gap_max_ms": max(gaps),
            "gap_usual_ms": statistics.median(usual),
            "chunk_step_ms": statistics.median(chunk_steps),
        }
    finally:
        stop(proc)


def render(reading_: dict[str, Any], long_: dict[str, Any] | None, stack: str,
           threads: int) -> tuple[list[str], list[tuple[str, bool, str]]]:  # fmt: skip
    lines = [
        f"{stack}. Prompt reading: llama.cpp's `llama-bench -t {threads} -p "
        f"{','.join(map(str, BENCH_LENGTHS))} -n {N_GEN} -r 3` and a real daemon "
        f"(n_ctx {N_CTX}, {auto_parallel(threads, N_CTX)} slots) reading new prompts one at a "
        "time (`timings.prompt_ms` and `usage.evaluated_tokens` from its `done`, median of "
        "3), in the order llama-bench, daemon, daemon, llama-bench for each kernel choice; "
        "each figure is the mean of its two runs. Tokens/s.",
        "",
        "| kernels | llama-bench pp128 | llama-bench pp512 | llama-bench tg64 | "
        + " | ".join(f"daemon ~{n}" for n in LENGTHS)
        + " | daemon ~512 vs llama-bench pp512 (same kernels) |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in LENGTHS) + " | ---: |",
    ]
    for label, r in reading_.items():
        lb, dm = r["llama-bench"], r["daemon"]
        same = f"{dm[512][0] / lb['pp512']:.0%}" if lb else "-"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{lb[k]:.1f}" if lb else "-" for k in ("pp128", "pp512", f"tg{N_GEN}"))
            + " | "
            + " | ".join(f"{dm[n][0]:.1f} ({dm[n][1]} tok)" for n in LENGTHS)
            + f" | {same} |"
        )
    checks: list[tuple[str, bool, str]] = []
    labels = [label for label, _ in KERNELS]
    default, fastest = reading_[labels[0]], reading_[labels[1]]
    if fastest["llama-bench"]:
        ours, theirs = default["daemon"][512][0], fastest["llama-bench"]["pp512"]
        checks.append(
            (
                "prompt reading, default settings: daemon at ~512 tokens at least 95% of "
                "llama-bench pp512 with llama.cpp's defaults",
                ours >= 0.95 * theirs,
                f"{ours:.1f} vs {theirs:.1f} tok/s ({ours / theirs:.0%})",
            )
        )
    if long_:
        lines += [
            "",
            f"{stack}, default kernels, prefill_chunk 128. {long_['streams']} clients stream "
            f"long answers; a new prompt of {long_['tokens']} tokens arrives (median of 2):",
            "",
            "| long prompt alone: TTFT (ms) | beside the streams: TTFT (ms) | streams' usual gap "
            "between tokens (ms) | their longest gap while it is read (ms) | one step with a "
            "chunk (ms) |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {long_['solo_ttft_ms']:.0f} | {long_['loaded_ttft_ms']:.0f} | "
            f"{long_['gap_usual_ms']:.0f} | {long_['gap_max_ms']:.0f} | "
            f"{long_['chunk_step_ms']:.0f} |",
        ]
        checks.append(
            (
                "a long prompt under load stalls the streams at most about one chunk step",
                long_["gap_max_ms"] <= 1.5 * long_["chunk_step_ms"],
                f"longest gap {long_['gap_max_ms']:.0f} ms, one chunk step "
                f"{long_['chunk_step_ms']:.0f} ms",
            )
        )
    return lines, checks


def main() -> int:
    import argparse
    import tempfile

    from bench_concurrency import build_llama_tool

    from edgeagent import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    manifest = models.load_manifest()
    model_file = models.fetch(manifest.get(manifest.default))
    binary = build_llama_tool("llama-bench")
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        r = reading(model_file, Path(tmp), args.threads, binary)
        long_ = long_prompt_under_load(model_file, Path(tmp), args.threads)
    lines, checks = render(r, long_, f"{args.threads} threads", args.threads)
    print("\n".join(lines))
    for name, ok, value in checks:
        print(f"{'pass' if ok else 'FAIL'}: {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
