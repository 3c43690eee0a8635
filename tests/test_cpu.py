"""CPU placement: the rules on fake sysfs trees, and the real affinities of a running daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from edgeagent import cpu
from tests.conftest import Daemon, connect


def fake_sysfs(root: Path, freqs_khz: dict[int, int]) -> Path:
    for core, khz in freqs_khz.items():
        d = root / f"devices/system/cpu/cpu{core}/cpufreq"
        d.mkdir(parents=True)
        (d / "cpuinfo_max_freq").write_text(f"{khz}\n")
    return root


def test_big_little_board_runs_inference_on_the_big_cores(tmp_path: Path) -> None:
    # An RK3588-like board: four A55 at 1.8 GHz, four A76 at 2.4 GHz.
    root = fake_sysfs(tmp_path, {**dict.fromkeys(range(4), 1_800_000),
                                 **dict.fromkeys(range(4, 8), 2_400_000)})  # fmt: skip
    p = cpu.pick_placement("auto", "auto", 0, tuple(range(8)), root)
    assert p.inference == (4, 5, 6, 7) and p.io == (0, 1, 2, 3) and p.threads == 4
    assert "big.LITTLE" in p.reason


def test_three_tier_cpu_keeps_prime_and_performance_cores(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: 2_000_000, 1: 2_000_000, 2: 2_800_000, 3: 2_800_000,
                                 4: 3_200_000})  # fmt: skip
    p = cpu.pick_placement("auto", "auto", 0, (0, 1, 2, 3, 4), root)
    assert p.inference == (2, 3, 4) and p.io == (0, 1)


def test_big_little_respects_the_allowed_cores(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: 1_800_000, 1: 1_800_000, 2: 2_400_000, 3: 2_400_000})
    p = cpu.pick_placement("auto", "auto", 0, (0, 1, 2), root)  # AllowedCPUs=0-2
    assert p.inference == (2,) and p.io == (0, 1)


def test_same_speed_cores(tmp_path: Path) -> None:
    p = cpu.pick_placement("auto", "auto", 0, tuple(range(8)), tmp_path)  # no cpufreq at all
    assert p.inference == tuple(range(1, 8)) and p.io == (0,) and p.threads == 7
    small = cpu.pick_placement("auto", "auto", 0, (0, 1), tmp_path)
    assert small.inference == (0, 1) and small.io == (0, 1)


def test_explicit_cores_and_threads(tmp_path: Path) -> None:
    p = cpu.pick_placement((2, 3), (0,), 1, (0, 1, 2, 3), tmp_path)
    assert (p.inference, p.io, p.threads) == ((2, 3), (0,), 1)
    with pytest.raises(cpu.PlacementError, match=r"cpu.cores: 5 not allowed.*allowed: 0-3"):
        cpu.pick_placement((3, 5), "auto", 0, (0, 1, 2, 3), tmp_path)
    with pytest.raises(cpu.PlacementError, match=r"cpu\.io_cores: 9 not allowed"):
        cpu.pick_placement("auto", (9,), 0, (0, 1, 2, 3), tmp_path)


def test_cpulist_round_trip() -> None:
    assert cpu.parse_cpulist("0-3,6,8-9\n") == (0, 1, 2, 3, 6, 8, 9)
    assert cpu.format_cpulist((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"


def daemon_threads(pid: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _tid, name, cores in cpu.thread_affinities(pid):
        out.setdefault(name, set()).add(cpu.format_cpulist(cores))
    return out


def test_running_daemon_threads_sit_on_the_chosen_cores(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    if len(cpu.allowed_cores()) < 2:
        pytest.skip("needs two cores")
    a, b = cpu.allowed_cores()[:2]
    # A fake board: core a is a little core, core b a big one.
    root = fake_sysfs(tmp_path / "sys", {a: 1_000_000, b: 2_000_000})
    d = daemon_factory(extra=f'[cpu]\nthreads = 2\nsysfs_root = "{root}"\n')
    with connect(d.socket_path) as c:
        c.send({"id": "w", "prompt": "Say OK.", "max_tokens": 4})
        assert c.until_final("w")[-1]["event"] == "done"
        status = c.op("status")["cpu"]
    assert status["inference_cores"] == str(b) and status["io_cores"] == str(a)
    assert d.proc is not None
    threads = daemon_threads(d.proc.pid)
    # The inference thread and llama.cpp's workers (named after it) are on the big core ...
    assert threads.pop("ea-inference") == {str(b)}
    inference_threads = [t for t in cpu.thread_affinities(d.proc.pid) if t[1] == "ea-inference"]
    assert len(inference_threads) >= 2
    # ... and every other thread (event loop, executor) on the little one.
    assert threads and all(cores == {str(a)} for cores in threads.values()), threads
    assert status["thread_affinity"]


def test_explicit_placement_and_a_core_the_daemon_may_not_use(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    allowed = cpu.allowed_cores()
    d = daemon_factory(extra=f"[cpu]\ncores = [{allowed[0]}]\nio_cores = [{allowed[-1]}]\n")
    assert d.proc is not None
    threads = daemon_threads(d.proc.pid)
    assert threads.pop("ea-inference") == {str(allowed[0])}
    assert all(cores == {str(allowed[-1])} for cores in threads.values())
    with connect(d.socket_path) as c:
        assert c.op("status")["cpu"]["threads"] == 1
    d.stop()

    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[cpu]\ncores = [4095]\n[socket]\npath = "{tmp_path}/s.sock"\n')
    res = subprocess.run([sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 2
    assert f"{cfg}: cpu.cores: 4095 not allowed for this process" in res.stderr
