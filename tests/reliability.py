"""What the fault, fuzz and security tests record, so docs/reliability.md is built from real runs.

Each scenario calls `record(...)` once it has asserted its outcome; the rows go to
`run/reliability/<scenario>.json` (or $EDGEAGENT_RELIABILITY_DIR), and
`scripts/reliability_report.py` turns them into the table in docs/reliability.md. The benchmark
scripts open each of their tables with `measured_by()`, from the same `provenance()`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def provenance() -> dict[str, str]:
    """Where a record comes from: the commit (with `+changes` when the tree was not clean) and
    the machine (CPU model, cores the process may use), so a figure is never read without it."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # Changes to the documents alone change nothing measured: a benchmark that has just
    # rewritten docs/benchmarks.md still ran the committed code.
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs", ":!*.md"):
        commit += "+changes"
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # A VM may name its CPU only "AMD EPYC": family and model tell the generation.
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    return {"commit": commit, "machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores"}


def measured_by(argv: Sequence[str] | None = None) -> str:
    """How a benchmark's figures open: the date (UTC), the command as it was run (the script's
    path from the repository's root, then its arguments; sys.argv by default), the commit and
    the machine, from `provenance()`. Call it when the run starts, before --write touches the
    tree."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    command = shlex.join([str(script), *argv[1:]])
    where = provenance()
    return (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} (UTC) by `{command}` at commit "
        f"{where['commit']} on {where['machine']}"
    )


def results_dir() -> Path:
    return Path(os.environ.get("EDGEAGENT_RELIABILITY_DIR", ROOT / "run" / "reliability"))


def record(
    scenario: str,
    *,
    category: str,
    load: str,
    faults: str,
    inputs: str,
    accepted: int,
    answered: int,
    lost: int,
    duplicated: int,
    figures: dict[str, Any] | None = None,
    refused: int = 0,
) -> None:
    """Store one scenario's outcome: what was done to the daemon and what came back.

    `accepted` counts requests the daemon took on (not refused with busy); `answered` those
    of them that got their one final event; `refused` requests turned away at once (busy, or
    a bad reply address) without being taken on, counted apart from the answers; `lost` and
    `duplicated` are what the test measured, never assumed (a test asserts them to be zero
    before recording).
    """
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    row = {
        "scenario": scenario,
        "category": category,
        "load": load,
        "faults": faults,
        "inputs": inputs,
        "accepted": accepted,
        "answered": answered,
        "refused": refused,
        "lost": lost,
        "duplicated": duplicated,
        "figures": figures or {},
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance(),
    }
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", scenario)
    (out / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
