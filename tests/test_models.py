"""Model manifest, verification and refusal of a file that is not what it claims to be."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent import models


def test_manifest_default_model() -> None:
    manifest = models.load_manifest()
    spec = manifest.get(manifest.default)
    assert spec.size == 491_400_064
    assert spec.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert spec.sources[0].kind == "pip"
    assert len(spec.sources[0].packages) == 6
    assert "qwen2.5-0.5b-instruct-q4_k_m" in manifest.models  # the second source


def test_unknown_model_name() -> None:
    with pytest.raises(models.ModelError, match="unknown model 'nope'; known models"):
        models.load_manifest().get("nope")


def test_verify_accepts_good_and_refuses_wrong_size_or_checksum(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    assert models.verify(f, 1004, good) == good
    with pytest.raises(models.ModelError, match="has 1004 bytes, expected 2000"):
        models.verify(f, 2000, good)
    with pytest.raises(models.ModelError, match="expected " + "0" * 64):
        models.verify(f, 1004, "0" * 64)
    with pytest.raises(models.ModelError, match="does not exist"):
        models.verify(tmp_path / "missing.gguf", None, None)


def test_verify_stamp_is_invalidated_when_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 100)
    good = hashlib.sha256(b"a" * 100).hexdigest()
    models.verify(f, 100, good)
    assert (tmp_path / "m.gguf.verified").exists()
    f.write_bytes(b"b" * 100)  # same size, new content: must be re-hashed and refused
    with pytest.raises(models.ModelError, match="corrupted or wrong file"):
        models.verify(f, 100, good)


def test_cached_default_model_verifies(model_file: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "edgeagent", "model", "verify"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ok (sha256 1d9614638d18" in res.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "edgeagent", "model", "list"], capture_output=True, text=True
    )
    assert "qwen2.5-coder-0.5b-instruct-q4_k_m" in listing.stdout and "cached" in listing.stdout


def _run_daemon(
    tmp_path: Path, config: str, env_extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config + f'\n[socket]\npath = "{tmp_path}/s.sock"\n')
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_daemon_refuses_a_truncated_cached_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    res = _run_daemon(tmp_path, "", {"EDGEAGENT_MODEL_DIR": str(cache)})
    assert res.returncode == 3
    assert "has 4100 bytes, expected 491400064" in res.stderr
    assert "refusing to load it" in res.stderr
    assert not (tmp_path / "s.sock").exists()


def test_daemon_refuses_a_file_with_the_wrong_checksum(tmp_path: Path) -> None:
    f = tmp_path / "other.gguf"
    f.write_bytes(b"GGUF" + b"\1" * 4096)
    res = _run_daemon(tmp_path, f'[model]\npath = "{f}"\nsha256 = "{"ab" * 32}"\n', {})
    assert res.returncode == 3
    assert (
        f"sha256 {hashlib.sha256(f.read_bytes()).hexdigest()}, expected {'ab' * 32}" in res.stderr
    )


def test_daemon_reports_a_missing_model(tmp_path: Path) -> None:
    res = _run_daemon(tmp_path, "", {"EDGEAGENT_MODEL_DIR": str(tmp_path / "empty")})
    assert res.returncode == 3
    assert "does not exist; run `edgeagent model fetch`" in res.stderr


def test_daemon_reports_an_unloadable_model_file(tmp_path: Path) -> None:
    f = tmp_path / "garbage.gguf"
    f.write_bytes(b"this is not a gguf file" * 100)
    res = _run_daemon(tmp_path, f'[model]\npath = "{f}"\n', {})
    assert res.returncode == 3
    assert "cannot load model" in res.stderr
