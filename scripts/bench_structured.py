#!/usr/bin/env python3
"""Structured answers, measured: edgeagent's `format` against free text, side by side with raw
llama-cpp-python (its `response_format` with the same schema), in one run.

1. Speed: ten of the factory questions (two of each kind in tests/structured_prompts.py), each
   asked with its schema spelled out in the prompt, as `format` and without a constraint, on
   both sides, the order alternating each round.
   TTFT and decode tokens/s as a client sees them; the target is constrained decoding at
   90% or more of free text's tokens/s.
2. Compilation: the first request with a schema the daemon has not seen (a new grammar to
   parse) against the same schema again (kept by its hash) and free text, TTFT of each, each
   question new.
3. Rates: all fifty questions through the daemon, four at a time, with the schema as
   `format` and without a constraint, the schema given in the prompt both times ("Answer
   only with JSON that fits this JSON Schema: ..."): how many answers parse as JSON, and how
   many fit the schema.

    .venv/bin/python scripts/bench_structured.py [--rounds 2] [--write]

With --write the tables go into docs/benchmarks.md between its structured markers. Run beside
nothing else.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import jsonschema

from edgeagent import __version__, models
from tests.reliability import measured_by
from tests.structured_prompts import MAX_TOKENS, PROMPTS

MARK_BEGIN = "<!-- structured:begin -->"
MARK_END = "<!-- structured:end -->"
SPEED_PROMPTS = [p for kind in ("alarm", "checklist", "yes/no", "extraction", "chinese")
                 for p in [q for q in PROMPTS if q[0] == kind][:2]]  # fmt: skip


def instructed(prompt: str, schema: dict[str, Any]) -> str:
    """The question with its schema spelled out: what a client without constrained decoding
    has to rely on, and the same text the constrained request gets."""
    return f"{prompt}\nAnswer only with JSON that fits this JSON Schema: {json.dumps(schema)}"


def raw_run(llm: Any, prompt: str, schema: dict[str, Any] | None) -> tuple[float, float, int]:
    extra = {"response_format": {"type": "json_object", "schema": schema}} if schema else {}
    stream = llm.create_chat_completion(
        [{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0,
        stream=True, **extra,
    )  # fmt: skip
    return bench.measure_stream(stream, lambda c: bool(c["choices"][0]["delta"].get("content")))


def daemon_run(client: bench.SocketClient, rid: str, prompt: str,
               schema: dict[str, Any] | None) -> tuple[float, float, int]:  # fmt: skip
    req: dict[str, Any] = {"id": rid, "prompt": prompt, "max_tokens": MAX_TOKENS,
                           "temperature": 0.0}  # fmt: skip
    if schema is not None:
        req["format"] = schema
    return bench.measure_stream(client.request(req), lambda e: e["event"] == "token")


def ask_rates(sock: str, constrained: bool) -> dict[str, int]:
    """All fifty questions, four connections at a time: answers that parse, and that fit."""

    def one_connection(part: list[tuple[int, tuple[str, str, dict[str, Any]]]]) -> list[Any]:
        out = []
        client = bench.SocketClient(sock)
        for i, (_kind, prompt, schema) in part:
            req: dict[str, Any] = {"id": f"r{i}", "prompt": instructed(prompt, schema),
                                   "max_tokens": MAX_TOKENS, "temperature": 0.0,
                                   "stream": False}  # fmt: skip
            if constrained:
                req["format"] = schema
            client.sock.sendall(json.dumps(req).encode() + b"\n")
            out.append((json.loads(client.file.readline()), schema))
        client.sock.close()
        return out

    items = list(enumerate(PROMPTS))
    counts = {"asked": 0, "done": 0, "parsed": 0, "valid": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for answers in pool.map(one_connection, [items[k::4] for k in range(4)]):
            for event, schema in answers:
                counts["asked"] += 1
                counts["done"] += event["event"] == "done"
                try:
                    value = json.loads(event.get("text", ""))
                except ValueError:
                    continue
                counts["parsed"] += 1
                try:
                    jsonschema.validate(value, schema)
                except jsonschema.ValidationError:
                    continue
                counts["valid"] += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    origin = measured_by()
    spec = models.load_manifest().get(models.load_manifest().default)
    model_file = models.fetch(spec)
    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_version

    llm = Llama(model_path=str(model_file), n_ctx=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)  # fmt: skip
    speed: dict[str, dict[str, list[float]]] = {
        f"{side} {mode}": {"ttft": [], "tps": []}
        for side in ("raw", "edgeagent") for mode in ("free", "schema")
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        proc, _ready, sock = bench.start_daemon(
            model_file, Path(tmp), args.n_ctx, f"threads = {args.threads}", 0
        )
        try:
            client = bench.SocketClient(sock)
            raw_run(llm, "Hello", None)
            list(client.request({"id": "warm", "prompt": "Hello", "max_tokens": 4}))
            # 1. Speed, the order of sides and modes turning each round.
            n = 0
            runs = [(side, mode) for side in ("raw", "edgeagent") for mode in ("free", "schema")]
            for rnd in range(args.rounds):
                for i, (_kind, prompt, schema) in enumerate(SPEED_PROMPTS):
                    shift = (rnd + i) % len(runs)
                    for side, mode in runs[shift:] + runs[:shift]:
                        n += 1
                        # New each time (bench.schedule); the schema in the prompt both ways.
                        asked = f"Ticket {1000 + n}: {instructed(prompt, schema)}"
                        use = schema if mode == "schema" else None
                        if side == "raw":
                            raw_run(llm, "Hello", None)
                            ttft, tps, _ = raw_run(llm, asked, use)
                        else:
                            bench.daemon_hello(client, f"h{n}")
                            ttft, tps, _ = daemon_run(client, f"s{n}", asked, use)
                        speed[f"{side} {mode}"]["ttft"].append(ttft * 1000)
                        speed[f"{side} {mode}"]["tps"].append(tps)
            # 2. A schema seen for the first time (its grammar parsed) and again (kept).
            # Each question new (its own ticket): only the grammar differs between the three.
            compile_ms: dict[str, list[float]] = {"first": [], "again": [], "free": []}
            for k in range(5):
                _kind, prompt, schema = PROMPTS[k]
                fresh = {**schema, "description": f"alarm answer, variant {k} {time.time()}"}
                for j, (label, use) in enumerate((("first", fresh), ("again", fresh),
                                                  ("free", None))):  # fmt: skip
                    bench.daemon_hello(client, f"ch{k}{label}")
                    asked = f"Ticket {9000 + 3 * k + j}: {prompt}"
                    ttft, _, _ = daemon_run(client, f"c{k}{label}", asked, use)
                    compile_ms[label].append(ttft * 1000)
            client.sock.close()
            # 3. Parse and fit rates, with and without the constraint.
            rates = {"schema as `format`": ask_rates(sock, True),
                     "no constraint": ask_rates(sock, False)}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)

    s = {name: (bench.summarize(v["ttft"]), bench.summarize(v["tps"])) for name, v in speed.items()}
    share = 100 * s["edgeagent schema"][1]["p50"] / s["edgeagent free"][1]["p50"]
    raw_share = 100 * s["raw schema"][1]["p50"] / s["raw free"][1]["p50"]
    c = {label: bench.summarize(v) for label, v in compile_ms.items()}
    lines = [
        f"{origin}; edgeagent {__version__}, llama-cpp-python {llama_version}; model {spec.name}, "
        f"n_ctx {args.n_ctx}, {args.threads} threads, greedy, max_tokens {MAX_TOKENS}; "
        f"{args.rounds} rounds x {len(SPEED_PROMPTS)} questions per side and mode, order "
        "alternating. Command: `.venv/bin/python scripts/bench_structured.py --write`.",
        "",
        "| side | mode | TTFT p50 (ms) | TTFT p90 (ms) | tokens/s p50 | tokens/s mean |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *(f"| {name.split()[0]} | {name.split()[1]} | {t['p50']:.1f} | {t['p90']:.1f} | "
          f"{r['p50']:.1f} | {r['mean']:.1f} |" for name, (t, r) in s.items()),
        "",
        "| first request with a new schema vs again | TTFT p50 (ms) |",
        "| --- | ---: |",
        f"| new schema (grammar parsed) | {c['first']['p50']:.1f} |",
        f"| same schema again (grammar kept) | {c['again']['p50']:.1f} |",
        f"| free text, same question | {c['free']['p50']:.1f} |",
        "",
        "| 50 questions, schema in the prompt | answered | parse as JSON | fit the schema |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {r['done']}/{r['asked']} | {r['parsed']}/{r['asked']} | "
          f"{r['valid']}/{r['asked']} |" for name, r in rates.items()),
        "",
        "| target | result | measured |",
        "| --- | --- | --- |",
        f"| constrained decode at least 90% of free text's tokens/s | "
        f"{'pass' if share >= 90 else 'FAIL'} | {share:.1f}% (raw llama-cpp-python: "
        f"{raw_share:.1f}%) |",
        f"| every constrained answer parses and fits | "
        f"{'pass' if rates['schema as `format`']['valid'] == len(PROMPTS) else 'FAIL'} | "
        f"{rates['schema as `format`']['valid']}/{len(PROMPTS)} |",
    ]  # fmt: skip
    report = "\n".join(lines)
    print(report)
    if args.write:
        doc = bench.ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        if MARK_BEGIN not in text:
            text += f"\n## Structured answers\n\n{MARK_BEGIN}\n{MARK_END}\n"
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        doc.write_text(f"{head}{MARK_BEGIN}\n{report}\n{MARK_END}{tail}")
        print(f"wrote {doc}")
    ok = share >= 90 and rates["schema as `format`"]["valid"] == len(PROMPTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
