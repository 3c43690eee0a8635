#!/usr/bin/env python3
"""What client isolation costs in cached prompt cells: one daemon, 4 clients asking the
benchmark's repeated questions (scripts/bench_concurrency.py's), driven as

- a key per client over HTTP (a line of kiosks, each its own identity: another client's
  cells serve only the public start of a prompt, the template and the configured system
  prompt),
- one key for all over HTTP, and over the Unix socket from one uid (one identity: every
  cell may serve every request),
- a key per client again, with `[engine] share_prompt_cache = true` (a second daemon).

    .venv/bin/python scripts/bench_identity.py [--rounds 2]

Prints aggregate tokens/s, TTFT p50 and the prompt tokens evaluated per request, per way and
round. The numbers are quoted in docs/benchmarks.md; run beside nothing else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_concurrency as bc

from edgeagent import models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=6)
    args = ap.parse_args()
    print(bc.measured_by())
    spec = models.load_manifest().get(models.load_manifest().default)
    model_file = models.fetch(spec)
    for shared in (False, True):
        with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
            work = Path(tmp)
            port = bc.free_port()
            keys_file, keys = bc.client_keys(work)
            cfg, sock = bc.daemon_config(work, "identity", model_file, n_ctx=1024, threads=2,
                                         parallel=8, http_port=port,
                                         keys_file=keys_file)  # fmt: skip
            if shared:
                cfg.write_text(cfg.read_text().replace(
                    "[engine]\n", "[engine]\nshare_prompt_cache = true\n"))  # fmt: skip
            proc, _ = bc.start_daemon(work, cfg, sock)
            try:
                ways = {"http, a key per client": bc.run_openai(port, keys)}
                if not shared:
                    ways["http, one key for all"] = bc.run_openai(port, keys[:1])
                    ways["socket, one uid"] = bc.run_socket(sock)
                bc.drive(bc.run_socket(sock), 1, 1, 4, proc.pid)  # warm-up
                for r in range(args.rounds):
                    for name, run in ways.items():
                        p = bc.drive(run, args.clients, args.per_client, 64, proc.pid)
                        label = f"{name}{', share_prompt_cache' if shared else ''}"
                        print(f"round {r + 1}: {label:44} {args.clients} clients "
                              f"{p.aggregate_tps():5.1f} tok/s, TTFT p50 {p.ttft(0.5):4.0f} ms, "
                              f"evaluated {p.evaluated()}", flush=True)  # fmt: skip
            finally:
                bc.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
