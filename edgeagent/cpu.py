"""CPU placement: which cores run inference and which run I/O, and pinning threads to them.

On big.LITTLE boards the inference threads belong on the big cores; on boxes shared with
line-control software one core is left to I/O and everything else. Threads inherit their
creator's affinity, so pinning the inference thread before the model is created puts
llama.cpp's worker threads on the same cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("edgeagent.cpu")

BIG_CORE_RATIO = 0.8  # a core within 80% of the fastest one counts as a big core
PR_SET_NAME = 15


@dataclass(frozen=True)
class Placement:
    inference: tuple[int, ...]
    io: tuple[int, ...]
    threads: int
    reason: str

    def describe(self) -> str:
        return (
            f"inference on cores {format_cpulist(self.inference)} ({self.threads} threads), "
            f"I/O on cores {format_cpulist(self.io)}: {self.reason}"
        )


class PlacementError(Exception):
    """The configured cores cannot be used (not allowed for this process, empty...)."""


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,6' → (0, 1, 2, 3, 6), the kernel's cpulist format."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.update(range(int(lo), int(hi) + 1))
        else:
            cores.add(int(part))
    return tuple(sorted(cores))


def format_cpulist(cores: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 6) → '0-3,6'."""
    out: list[str] = []
    ordered = sorted(cores)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def allowed_cores() -> tuple[int, ...]:
    """Cores this process may run on: systemd's CPUAffinity= and cgroup AllowedCPUs= apply."""
    return tuple(sorted(os.sched_getaffinity(0)))


def max_frequencies(cores: tuple[int, ...], sysfs_root: Path) -> dict[int, Optional[int]]:
    """cpuinfo_max_freq (kHz) of each core, None where the box does not expose it."""
    out: dict[int, Optional[int]] = {}
    for core in cores:
        path = sysfs_root / f"devices/system/cpu/cpu{core}/cpufreq/cpuinfo_max_freq"
        try:
            out[core] = int(path.read_text().strip())
        except (OSError, ValueError):
            out[core] = None
    return out


def pick_placement(
    cores: Union[str, tuple[int, ...]],
    io_cores: Union[str, tuple[int, ...]],
    threads: int,
    allowed: tuple[int, ...],
    sysfs_root: Path,
) -> Placement:
    """Choose inference and I/O cores among `allowed` (see docs/deploy.md for the rules)."""
    if not allowed:
        raise PlacementError("no CPU is allowed for this process")
    if cores != "auto":
        assert isinstance(cores, tuple)
        bad = sorted(set(cores) - set(allowed))
        if bad:
            raise PlacementError(
                f"cpu.cores: {format_cpulist(tuple(bad))} not allowed for this process "
                f"(allowed: {format_cpulist(allowed)})"
            )
        inference, reason = cores, "configured"
        rest = tuple(c for c in allowed if c not in inference)
        io_auto = rest or inference
    else:
        freqs = max_frequencies(allowed, sysfs_root)
        known = {c: f for c, f in freqs.items() if f}
        top = max(known.values()) if len(known) == len(allowed) else 0
        big = tuple(c for c in allowed if top and known[c] >= BIG_CORE_RATIO * top)
        if top and len(big) < len(allowed):
            inference = big
            io_auto = tuple(c for c in allowed if c not in big)
            reason = (
                f"big cores (max {top // 1000} MHz) of a big.LITTLE CPU; the little cores take I/O"
            )
        elif len(allowed) >= 4:
            inference, io_auto = allowed[1:], allowed[:1]
            reason = f"same-speed cores: all but core {allowed[0]}, which is left to I/O"
        else:
            inference = io_auto = allowed
            reason = f"{len(allowed)} same-speed cores: inference and I/O share them"
    if io_cores == "auto":
        io = io_auto
    else:
        assert isinstance(io_cores, tuple)
        bad = sorted(set(io_cores) - set(allowed))
        if bad:
            raise PlacementError(
                f"cpu.io_cores: {format_cpulist(tuple(bad))} not allowed for this process "
                f"(allowed: {format_cpulist(allowed)})"
            )
        io = io_cores
    return Placement(tuple(inference), tuple(io), threads or len(inference), reason)


def pin_current_thread(cores: tuple[int, ...], name: Optional[str] = None) -> None:
    """Pin the calling thread (only it: pid 0 is the caller on Linux) and name it for `top`."""
    os.sched_setaffinity(0, cores)
    if name:
        set_thread_name(name)


def set_thread_name(name: str) -> None:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def thread_affinities(pid: Union[int, str] = "self") -> list[tuple[int, str, tuple[int, ...]]]:
    """(tid, name, allowed cores) of every thread of a process, read from /proc."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            fields = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                if ":\t" in line
            )  # fmt: skip
        except OSError:
            continue  # the thread ended meanwhile
        out.append(
            (int(task.name), fields["Name"].strip(), parse_cpulist(fields["Cpus_allowed_list"]))
        )
    return out
