#!/usr/bin/env python3
"""Tokens/s of greedy decoding with and without a JSON-schema grammar, for the same prompt on
one slot (edgeagent.decoder.sample's grammar-first draw), two rounds, with the grammar's
counters: how many tokens it was asked about and how many were drawn again. The first step
toward the structured-answer benchmark; run beside nothing else.

    .venv/bin/python scripts/grammar_probe.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_cpp.llama_grammar import json_schema_to_gbnf

from edgeagent import models
from edgeagent.decoder import BatchDecoder
from tests.test_structured import ALARM as SCHEMA  # the suite's alarm schema

QUESTION = (
    "Filler 3 shows alarm F17: low air pressure at the capper. Answer as JSON with the "
    "alarm, its severity and the checks to make."
)


def run(
    dec: BatchDecoder, tokens: list[int], grammar: str | None, n: int
) -> tuple[str, float, int]:
    slot = dec.slots[0]
    dec.clear(slot)
    dec.set_sampler(slot, 0.0, grammar=grammar)
    dec.reuse(slot, tokens)
    while slot.pending:
        take = min(len(slot.pending), dec.n_batch)
        for _ in dec.steps([], [(slot, take, take == len(slot.pending))]):
            pass
    out: list[int] = []
    t0 = time.perf_counter()
    tok = dec.sample(slot)
    while not dec.is_eog(tok) and len(out) < n:
        out.append(tok)
        for _ in dec.steps([(slot, tok)], []):
            pass
        tok = dec.sample(slot)
    dt = time.perf_counter() - t0
    text = b"".join(dec.piece(t) for t in out).decode(errors="replace")
    return text, len(out) / dt if dt else 0.0, len(out)


def main() -> int:
    spec = models.load_manifest().get(models.load_manifest().default)
    dec = BatchDecoder(models.fetch(spec), n_ctx=1024, n_slots=1, n_batch=512, n_threads=2)
    prompt = (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = dec.tokenize(prompt, special=True)
    t0 = time.perf_counter()
    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    print(f"schema to GBNF: {(time.perf_counter() - t0) * 1000:.1f} ms")
    for rnd in range(2):
        for name, g in (("free text", None), ("schema", gbnf)):
            t0 = time.perf_counter()
            if g is not None:
                dec.compile_grammar(g)
            compile_ms = (time.perf_counter() - t0) * 1000
            text, tps, n = run(dec, tokens, g, 96)
            print(
                f"round {rnd + 1} {name:9}: {tps:5.1f} tok/s over {n} tokens "
                f"(compile {compile_ms:.1f} ms) {dec.grammar_stats} {text[:120]!r}"
            )
    dec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
