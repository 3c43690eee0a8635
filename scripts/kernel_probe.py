#!/usr/bin/env python3
"""Which of llama.cpp's CPU kernel choices keep a token's logits bitwise the same whatever else
shares its step, and what each reads prompts at.

For each choice, in a process of its own (llama.cpp reads its kernel switches once per
process): a 600-token prompt is read alone in 512-token steps and then 6 tokens are decoded
greedily alone; that is the reference. Then the same prompt is read in smaller chunks while 1
to 3 other sequences decode in the same steps, and the same 6 tokens decoded beside them. The
logits after the prompt and after each token are compared bit for bit with the reference.
A second, separate pass times one 512-token read alone (median of 3).

    .venv/bin/python scripts/kernel_probe.py          # a markdown table

The default (`[engine] batch_invariant = true`) must come out identical in every case;
tests/test_batch_invariance.py runs `probe({})` in the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# (name, probe config): env for llama.cpp's switches; repack (edgeagent.decoder's
# use_extra_bufts), fa (flash attention), one_call (a step in one llama_decode call, rows of
# every role together, as with batch_invariant = false; without the tiled matmul's split,
# edgeagent.decoder does that by itself).
ROLES = {"env": {"GGML_CPU_TILED_MM": "1"}}
CHOICES: list[tuple[str, dict[str, Any]]] = [
    ("edgeagent's default: row-by-row matmul only (GGML_CPU_TILED_MM=0), one call per step", {}),
    ("GGML_CPU_TILED_MM=1 for edgeagent: prompt text tiled, the model's words (a prompt's last "
     "token among them) row by row", ROLES),
    ("tiled matmul from 8 rows up in one call per step (llama.cpp's default)",
     {"one_call": True, "env": {"GGML_CPU_TILED_MM": "1"}}),
    ("tiled matmul at every size (GGML_CPU_TILED_MM_FORCE=1), one call per step",
     {"env": {"GGML_CPU_TILED_MM": "1", "GGML_CPU_TILED_MM_FORCE": "1"}}),
    ("repacked weights (CPU_REPACK buffers), one call per step",
     {"repack": True, "one_call": True, "env": {"GGML_CPU_TILED_MM": "0"}}),
    ("flash attention, one call per step", {"fa": True}),
]  # fmt: skip
# (prompt chunk, sequences decoding beside it)
CASES = ((128, 3), (64, 2), (7, 1))
PROMPT_TOKENS, DECODED = 600, 6
AGAIN = "a follow-up, the decoded answer read again as the model's words"
CONTROL = "control: the same, the answer read again as prompt text"


def probe(config: dict[str, Any], model_file: Path | None = None, timing: bool = False,
          threads: int = 2) -> dict[str, Any]:  # fmt: skip
    """Run one kernel choice in a child process; {case: [identical?] * (1 + DECODED)}, plus
    `pp512` (tokens/s) when `timing`."""
    if model_file is None:
        from edgeagent import models

        manifest = models.load_manifest()
        model_file = models.fetch(manifest.get(manifest.default))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_CPU_TILED_MM")}
    env.update(config.get("env", {}))
    job = {**config, "model": str(model_file), "timing": timing, "threads": threads}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"kernel probe {config} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import time

    import llama_cpp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from edgeagent.decoder import BatchDecoder

    init = llama_cpp.llama_init_from_model

    def with_attention(model: Any, cparams: Any) -> Any:
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if job.get("fa")
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        return init(model, cparams)

    llama_cpp.llama_init_from_model = with_attention
    dec = BatchDecoder(
        Path(job["model"]), n_ctx=1024, n_slots=4, n_batch=512, n_threads=job["threads"],
        batch_invariant=not job.get("repack"),
    )  # fmt: skip
    if job.get("one_call"):
        dec.split_roles = False
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "protocol.md").read_text()
    tokens = dec.tokenize(text, special=False)
    prompt, other = tokens[:PROMPT_TOKENS], tokens[-40:]

    def logits(slot: Any) -> Any:
        ptr = llama_cpp.llama_get_logits_ith(dec.ctx, slot.logits_at)
        return np.ctypeslib.as_array(ptr, shape=(dec.n_vocab,)).copy()

    def as_asked(n: int) -> list[bool]:
        """A prompt's roles as the engine gives them: text, and the last token with the
        model's words (it rides along with the decoding streams)."""
        return [False] * (n - 1) + [True]

    def run(chunk: int, beside: int) -> list[Any]:
        """The engine's way: `steps` with the prompt's chunks and the others' tokens."""
        for s in dec.slots:
            dec.clear(s)
        mine, others = dec.slots[0], dec.slots[1 : 1 + beside]
        nxt: dict[int, int] = {}
        seen: list[Any] = []

        def step(decoding: list[tuple[Any, int]], reads: list[tuple[Any, int, bool]]) -> None:
            for ready in dec.steps(decoding, reads):
                for s in ready:
                    row = logits(s)
                    if s is mine:
                        seen.append(row)
                    else:
                        nxt[s.seq] = int(np.argmax(row))

        for o in others:
            o.pending, o.written = list(other), as_asked(len(other))
            step([], [(o, len(o.pending), True)])
        mine.pending, mine.written = list(prompt), as_asked(len(prompt))
        while mine.pending:
            n = min(chunk, len(mine.pending))
            step([(o, nxt[o.seq]) for o in others], [(mine, n, n == len(mine.pending))])
        for _ in range(DECODED):
            step([(mine, int(np.argmax(seen[-1])))] + [(o, nxt[o.seq]) for o in others], [])
        return seen

    def read_again(as_words: bool) -> list[bool]:
        """A follow-up after the decoded answer (its cells cached), against the same tokens
        read from scratch in 128-token chunks, the answer marked as the model's words or
        not."""
        mine = dec.slots[0]
        held, n_prompt = list(mine.cached), len(prompt)
        mine.pending, mine.written = list(other), as_asked(len(other))
        for ready in dec.steps([], [(mine, len(other), True)]):
            if mine in ready:
                cached_then = logits(mine)
        dec.clear(mine)
        mine.pending = held + other
        mine.written = as_asked(n_prompt)[:-1] + [as_words] * (len(held) - n_prompt + 1)
        mine.written += as_asked(len(other))
        while mine.pending:
            n = min(128, len(mine.pending))
            for ready in dec.steps([], [(mine, n, n == len(mine.pending))]):
                if mine in ready:
                    again = logits(mine)
        return [bool(np.array_equal(cached_then, again))]

    reference = run(512, 0)
    result: dict[str, Any] = {
        f"{chunk}-token chunks beside {beside}": [
            bool(np.array_equal(a, b)) for a, b in zip(reference, run(chunk, beside))
        ]
        for chunk, beside in CASES
    }
    run(512, 0)
    result[AGAIN] = read_again(True)
    run(512, 0)
    result[CONTROL] = read_again(False)
    if job.get("timing"):
        slot, rates = dec.slots[0], []
        for _ in range(3):
            dec.clear(slot)
            slot.pending, slot.written = prompt[:512], [False] * 512
            t0 = time.perf_counter()
            for _ in dec.steps([], [(slot, 512, True)]):
                pass
            rates.append(512 / (time.perf_counter() - t0))
        result["pp512"] = sorted(rates)[1]
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return 0
    threads = len(os.sched_getaffinity(0))
    print(
        f"| kernels ({threads} threads) | prompt chunked beside other streams: identical "
        f"after the prompt | and over {DECODED} decoded tokens | an answer read again with its "
        "conversation: identical to its cached cells | 512-token read alone (tok/s) |"
    )
    print("| --- | --- | --- | --- | ---: |")
    for name, config in CHOICES:
        r = probe(config, timing=True, threads=threads)
        cases = [v for k, v in r.items() if k not in ("pp512", AGAIN, CONTROL)]
        yes = ("no", "yes")
        again = yes[r[AGAIN][0]] + (
            ""
            if r[CONTROL][0] == r[AGAIN][0]
            else f" ({yes[r[CONTROL][0]]} if read as prompt text)"
        )
        print(
            f"| {name} | {yes[all(c[0] for c in cases)]} | {yes[all(all(c[1:]) for c in cases)]}"
            f" | {again} | {r['pp512']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
