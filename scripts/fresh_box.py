#!/usr/bin/env python3
"""The newcomer's path, timed: README's two commands on a fresh Debian box from a clean clone.

Boots a Debian bookworm box (tests/container.py: systemd-nspawn over a throwaway overlay)
that holds a minimal system plus only what README tells a newcomer to install, clones this
checkout's HEAD into it, and times, one after the other:

  1. `make run`, until the daemon answers README's demo question over its socket (`nc -NU`);
  2. `make test`, to its end.

Nothing from this machine's caches goes in: the box compiles llama.cpp, downloads the model and
installs every package itself (from Debian and PyPI: it needs the network). It trusts the CA
certificates this machine trusts, so a proxy's CA works there too. Needs root; takes about 20
minutes on 2 cores. Writes run/fresh-box.json and the logs beside it, and prints a summary.

    sudo .venv/bin/python scripts/fresh_box.py          # or: make fresh-box
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import container
from tests.reliability import provenance

# A minimal Debian with systemd, and README's "Two commands" prerequisites (kept in step by
# tests/test_docs.py): nothing else.
BASE = ("systemd", "systemd-sysv", "dbus", "ca-certificates")
README_PACKAGES = ("make", "python3", "git", "netcat-openbsd")
DEMO = '{"id":"1","prompt":"What is a PLC?","max_tokens":30}'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "run" / "fresh-box")
    ap.add_argument("--skip-test", action="store_true", help="time `make run` only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the box needs mount and systemd-nspawn")
    if container.missing_tools():
        sys.exit(f"install {' '.join(container.missing_tools())} first (make system-deps)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgeagent-fresh-"))
    record: dict[str, object] = {
        "command": " ".join(["scripts/fresh_box.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "packages": list(BASE + README_PACKAGES),
        **provenance(),
    }
    box = container.Box(container.tree(args.out / "mmdebstrap.log", BASE + README_PACKAGES), work)
    try:
        box.boot()
        subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT),
                        str(box.root / "root" / "edgeagent")], check=True)  # fmt: skip
        record["make_run_s"], record["demo_answer"] = time_make_run(box, args.out)
        print(f"make run: answered after {record['make_run_s']:.0f} s", flush=True)
        if not args.skip_test:
            record.update(time_make_test(box, args.out))
            took = f"{record['make_test_s']:.0f} s"
            print(f"make test: exit {record['make_test_exit']} after {took}: "
                  f"{record['make_test_summary']}", flush=True)  # fmt: skip
    finally:
        box.shutdown()
        subprocess.run(["rm", "-rf", str(work)], check=False)
        (args.out / "fresh-box.json").write_text(json.dumps(record, indent=2) + "\n")
    ok = record.get("demo_answer") and record.get("make_test_exit", 0) == 0
    return 0 if ok else 1


def in_box(box: container.Box, script: str) -> list[str]:
    """nsenter arguments for `script` run by bash in the clone, as root, as a login shell would."""
    assert box.leader
    env = [f"{k}={v}" for k, v in {"PATH": container.BOX_PATH, "HOME": "/root",
                                   "LANG": "C.UTF-8", "TERM": "dumb"}.items()]  # fmt: skip
    return ["nsenter", "-t", str(box.leader), "-a", "-r", "-w", "env", "-i", *env,
            "bash", "-c", f"cd /root/edgeagent && {script}"]  # fmt: skip


def time_make_run(box: container.Box, out: Path) -> tuple[float, str]:
    """Seconds from `make run` to the demo's answer, and that answer's final line."""
    started = time.monotonic()
    with open(out / "make-run.log", "wb") as log:
        proc = subprocess.Popen(in_box(box, "exec make run"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        sock = box.path("/root/edgeagent/run/edgeagent.sock")
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"make run exited {proc.returncode}; see {out}/make-run.log")
            if sock.exists():
                demo = in_box(box, f"echo '{DEMO}' | nc -NU run/edgeagent.sock")
                res = subprocess.run(demo, capture_output=True, text=True, timeout=300,
                                     check=False)  # fmt: skip
                lines = [ln for ln in res.stdout.splitlines() if '"event":"done"' in ln]
                if lines:
                    return time.monotonic() - started, lines[-1]
            if time.monotonic() - started > 3600:
                raise SystemExit("make run did not answer within an hour")
            time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # make run may have ended by itself
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the newcomer would
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def time_make_test(box: container.Box, out: Path) -> dict[str, object]:
    started = time.monotonic()
    with open(out / "make-test.log", "wb") as log:
        res = subprocess.run(in_box(box, "make test"), stdout=log, stderr=subprocess.STDOUT,
                             timeout=7200, check=False)  # fmt: skip
    lines = (out / "make-test.log").read_text(errors="replace").splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and "=" in ln), "")
    return {"make_test_s": time.monotonic() - started, "make_test_exit": res.returncode,
            "make_test_summary": summary}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
