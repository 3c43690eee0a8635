"""KV reuse: where a new prompt's cells come from.

A prompt's start may already be computed: in the slot it is given, in another slot, in a
session's saved cells, in the RAM prompt cache (promptcache.py), or in a snapshot of a system
prompt (PrefixStore: RAM and disk, so it survives restarts). KvReuse picks the slot and the
source for each prompt; it takes the decoder as an argument, so its rules can be tested with
a stand-in that only records cells.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from edgeagent.decoder import Slot, common_prefix, starts_with
from edgeagent.promptcache import PromptCache
from edgeagent.sessions import Conversation, SessionStore

log = logging.getLogger("edgeagent.engine")


def default_prefix_dir() -> Path:
    base = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if base:
        return Path(base) / "prefix"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeagent" / "prefix"


@dataclass
class Prefix:
    """The KV cells of a prompt's fixed start (its system part), ready to load into a slot."""

    tokens: list[int]
    state: bytes
    origin: str  # "computed", "disk"
    owner: str = ""  # "": the configured system prompt; else the client that sent its own
    last_used: float = field(default_factory=time.monotonic)


class PrefixStore:
    """System-prompt snapshots: in RAM under a byte budget, on disk keyed by model + tokens.

    A file holds a JSON header line (model sha256, n_ctx, owner, tokens, and an HMAC-SHA256
    of the header and the state under a key only the daemon can read) and the raw sequence
    state; it is written to a temporary name and renamed, so a crash leaves no half file
    behind. llama.cpp loads these bytes as they are, so a file whose MAC does not check out
    (damaged, or written by anyone but this daemon) is never loaded. A client's own system
    prompt is kept under its owner: only the same client reuses it.
    """

    MIN_TOKENS = 16
    KEY_FILE = "snapshot.key"
    KEY_BYTES = 32

    def __init__(self, directory: Optional[Path], model_sha256: str, n_ctx: int,
                 budget: int, max_files: int, flash_attn: bool = False,
                 kernels: str = "") -> None:  # fmt: skip
        self.dir, self.model_sha256, self.n_ctx = directory, model_sha256, n_ctx
        # Flash attention lays the V cells out differently: such a state does not load into a
        # context without it, so it is part of the key (absent when off: older files stay valid).
        self.flash_attn = flash_attn
        # Which kernels computed the cells (decoder.kernel_tag, set once the model is loaded):
        # cells read back must be the ones computing the prompt again would give, or answers
        # would depend on the cache.
        self.kernels = kernels
        self.budget, self.max_files = budget, max_files
        self._items: dict[tuple[str, tuple[int, ...]], Prefix] = {}
        # The inference thread changes _items, hits and rejected; status reads them on the
        # event loop (stats()).
        self._lock = threading.Lock()
        self._writers: list[threading.Thread] = []
        self._mac_key: Optional[bytes] = None
        self._key_lock = threading.Lock()  # the inference thread and the writer threads
        self.hits = collections.Counter[str]()
        self.rejected = 0  # files on disk whose MAC did not check out

    def key(self, tokens: list[int], owner: str = "") -> str:
        layout = ("fa:" if self.flash_attn else "") + (f"k:{self.kernels}:" if self.kernels else "")
        mine = f"owner:{owner}:" if owner else ""
        h = hashlib.sha256(f"{self.model_sha256}:{self.n_ctx}:{layout}{mine}".encode())
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
        return h.hexdigest()[:32]

    def get(self, tokens: list[int], owner: str = "") -> Optional[Prefix]:
        """The snapshot for exactly these tokens, from RAM or else from disk."""
        with self._lock:
            item = self._items.get((owner, tuple(tokens)))
        if item is None:
            item = self._read(tokens, owner)
            if item is not None:
                self._keep(item)
        if item is not None:
            item.last_used = time.monotonic()
        return item

    def add(self, tokens: list[int], state: bytes, owner: str = "") -> None:
        item = Prefix(list(tokens), state, "computed", owner)
        if self._keep(item) and self.dir is not None:
            writer = threading.Thread(target=self._write, args=(item,), name="prefix-writer")
            writer.start()
            self._writers = [w for w in self._writers if w.is_alive()] + [writer]

    def flush(self, timeout: float = 10.0) -> None:
        for writer in self._writers:
            writer.join(timeout)

    def hit(self, origin: str) -> None:
        """A snapshot from `origin` ("computed" or "disk") was loaded into a slot."""
        with self._lock:
            self.hits[origin] += 1

    def stats(self) -> dict[str, Any]:
        """For status, from any thread."""
        with self._lock:
            return {
                "prefix_snapshots": len(self._items),
                "prefix_mb": round(sum(len(p.state) for p in self._items.values()) / 1e6, 1),
                "prefix_hits": dict(self.hits),
                "prefix_rejected": self.rejected,
            }

    def ram_bytes(self) -> int:
        with self._lock:
            return sum(len(p.state) for p in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _keep(self, item: Prefix) -> bool:
        if len(item.state) > self.budget:
            return False
        with self._lock:
            self._items[item.owner, tuple(item.tokens)] = item
            total = sum(len(p.state) for p in self._items.values())
            for other in sorted(self._items.values(), key=lambda p: p.last_used):
                if total <= self.budget:
                    break
                if other is not item:
                    total -= len(other.state)
                    del self._items[other.owner, tuple(other.tokens)]
        return True

    def _key_bytes(self, create: bool) -> Optional[bytes]:
        """The MAC key, made once per cache directory, readable by the daemon's user only.

        It is written under a temporary name and linked into place whole, so a crash or
        another thread never sees a short key; a file of any other size is not a key.
        """
        assert self.dir is not None
        with self._key_lock:
            if self._mac_key is not None:
                return self._mac_key
            path = self.dir / self.KEY_FILE
            try:
                key = path.read_bytes()
            except FileNotFoundError:
                if not create:
                    return None
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp = path.with_name(f"{self.KEY_FILE}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(self.KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another daemon was quicker
                    os.link(tmp, path)
                tmp.unlink()
                key = path.read_bytes()
            if len(key) != self.KEY_BYTES:
                raise OSError(f"{path} is not a {self.KEY_BYTES}-byte key; remove it")
            self._mac_key = key
            return key

    @staticmethod
    def _mac(key: bytes, header: dict[str, Any], state: bytes) -> str:
        mac = hmac.new(key, json.dumps(header, sort_keys=True).encode(), hashlib.sha256)
        mac.update(state)
        return mac.hexdigest()

    def _read(self, tokens: list[int], owner: str) -> Optional[Prefix]:
        if self.dir is None:
            return None
        path = self.dir / f"{self.key(tokens, owner)}.kv"
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                state = f.read()
            key = self._key_bytes(create=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring prefix snapshot %s: %s", path, exc)
            return None
        if not isinstance(header, dict):
            header = {}
        mac = header.pop("mac", None)
        if (
            key is None
            or not isinstance(mac, str)
            or not hmac.compare_digest(mac, self._mac(key, header, state))
        ):
            with self._lock:
                self.rejected += 1
            log.warning("ignoring prefix snapshot %s: its MAC does not match its contents", path)
            return None
        if (
            header.get("model_sha256") != self.model_sha256
            or header.get("n_ctx") != self.n_ctx
            or header.get("flash_attn", False) != self.flash_attn
            or header.get("kernels", "") != self.kernels
            or header.get("owner", "") != owner
            or header.get("tokens") != tokens
            or header.get("bytes") != len(state)
        ):
            log.warning("ignoring prefix snapshot %s: it was made for something else", path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # newest files survive pruning
        return Prefix(list(tokens), state, "disk", owner)

    def _write(self, item: Prefix) -> None:
        assert self.dir is not None
        header: dict[str, Any] = {
            "model_sha256": self.model_sha256,
            "n_ctx": self.n_ctx,
            **({"flash_attn": True} if self.flash_attn else {}),
            **({"kernels": self.kernels} if self.kernels else {}),
            **({"owner": item.owner} if item.owner else {}),
            "tokens": item.tokens,
            "bytes": len(item.state),
        }
        path = self.dir / f"{self.key(item.tokens, item.owner)}.kv"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = self._key_bytes(create=True)
            assert key is not None
            header["mac"] = self._mac(key, header, item.state)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n")
                f.write(item.state)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            files = sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in files[self.max_files :]:
                old.unlink(missing_ok=True)
            log.info("saved a %d-token prompt prefix to %s", len(item.tokens), path)
        except OSError as exc:
            log.warning("cannot save prompt prefix to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()


# Copy another slot's cells when they hold at least this many more prompt tokens than the
# chosen slot has (a copy is about a millisecond; one token's evaluation is several).
COPY_MIN_TOKENS = 4


class Cells(Protocol):
    """What KvReuse needs of the decoder: its slots, and their cells as bytes."""

    slots: list[Slot]

    def save(self, slot: Slot) -> bytes: ...

    def load(self, slot: Slot, tokens: list[int], state: bytes) -> bool: ...

    def truncate(self, slot: Slot, keep: int) -> None: ...


class KvReuse:
    """Chooses the slot for a new prompt and loads the longest start of it that any cache
    holds. Used by the inference thread only; the stores' figures may be read anywhere."""

    def __init__(self, prefixes: PrefixStore, prompt_cache: PromptCache,
                 sessions: SessionStore) -> None:  # fmt: skip
        self.prefixes, self.prompt_cache, self.sessions = prefixes, prompt_cache, sessions
        self.slot_used: dict[int, float] = {}  # by sequence id: when it last took a prompt

    def took(self, seq: int) -> None:
        self.slot_used[seq] = time.monotonic()

    def swapped(self, a: int, b: int) -> None:
        """Two slots exchanged their cells (Engine._compact): their times go with them."""
        used = self.slot_used
        used[a], used[b] = used.get(b, 0.0), used.get(a, 0.0)

    def fill(
        self, dec: Cells, busy: Container[int], tokens: list[int],
        conv: Optional[Conversation], prefix_end: int, owner: str, public: int,
        prefix_owner: str,
    ) -> tuple[Slot, str]:  # fmt: skip
        """Pick a free slot for `tokens` and load the longest start of them that any cache
        holds; return the slot and where its cells came from.

        A slot whose cells this prompt continues (or repeats) is used as it is. Otherwise the
        prompt takes an empty slot, else the least recently used one, so that what the other
        slots hold stays for the prompts that need it; the cells it replaces go to the prompt
        cache. The start of the prompt then comes from whichever holds the most of it: the
        slot itself, the session's saved cells, another slot (copied), the prompt cache, or
        the system prompt's snapshot.

        Cells another client left behind serve only the prompt's `public` start (the template
        and the configured system prompt): reusing more would show in usage.cached_tokens how
        much of this prompt someone else sent recently.
        """
        last = len(tokens) - 1  # one prompt token is always evaluated, for its logits
        used = self.slot_used

        def reach(held: Sequence[int], whose: str = owner) -> int:
            n = min(common_prefix(held, tokens), last)
            return n if whose == owner else min(n, public)

        def slot_reach(s: Slot) -> int:
            return reach(s.cached, s.owner)

        free = [s for s in dec.slots if s.seq not in busy]
        best = max(free, key=lambda s: (slot_reach(s), -used.get(s.seq, 0.0)))
        lost = len(best.cached) - slot_reach(best)  # cells a new prompt would drop
        if slot_reach(best) == last or lost < COPY_MIN_TOKENS:
            slot = best
        else:
            slot = min(free, key=lambda s: (bool(s.cached), used.get(s.seq, 0.0)))
        have = slot_reach(slot)
        # (prompt tokens it holds, the margin over `have` it needs, name, its size in tokens,
        # its tokens and cells)
        Source = Callable[[], tuple[list[int], bytes]]
        options: list[tuple[int, int, str, int, Source]] = []
        if conv is not None and conv.kv_state is not None:
            state, held = conv.kv_state, list(conv.kv_tokens)
            options.append((reach(held), 1, "session", len(held), lambda: (held, state)))
        donor = max((s for s in dec.slots if s is not slot), key=slot_reach,
                    default=None)  # fmt: skip
        if donor is not None:
            # A running slot's cells too: a memory copy beats evaluating the tokens again.
            options.append((slot_reach(donor), COPY_MIN_TOKENS, "copied", len(donor.cached),
                            lambda: (list(donor.cached), dec.save(donor))))  # fmt: skip
        shared, key = self.prompt_cache.best(tokens, owner, public)
        if key is not None:
            # The bytes are held here: storing the slot's own cells below may evict the entry.
            saved, cells = list(key), self.prompt_cache.get(key)
            options.append((min(shared, last), COPY_MIN_TOKENS, "ram", len(key),
                            lambda: (saved, cells)))  # fmt: skip
        item = self.prefixes.get(tokens[:prefix_end], prefix_owner) if prefix_end > have else None
        if item is not None:
            found = item
            options.append((prefix_end, 1, f"prefix-{found.origin}", prefix_end,
                            lambda: (found.tokens, found.state)))  # fmt: skip
        # Most tokens first; on a tie the smallest state (the system prefix's snapshot rather
        # than a long conversation copied from another slot). The next one if a load fails.
        ranked = sorted((o for o in options if o[0] >= have + o[1]), key=lambda o: (-o[0], o[3]))
        if not ranked:
            if len(slot.cached) - have >= COPY_MIN_TOKENS and have < last:
                self.stash(dec, slot)
            return slot, "slot"
        self.stash(dec, slot)  # all of its cells are replaced
        for n, _margin, name, _size, source in ranked:
            held, state = source()
            if dec.load(slot, held, state):
                # What was loaded beyond the `n` tokens this prompt may use goes at once: the
                # slot is this client's now.
                dec.truncate(slot, n)
                slot.owner = owner
                if name == "ram" and key is not None:
                    self.prompt_cache.hit(key)
                elif name.startswith("prefix-"):
                    self.prefixes.hit(name.removeprefix("prefix-"))
                return slot, name
            log.warning("llama.cpp refused %d cached tokens (%s) for slot %d", len(held), name,
                        slot.seq)  # fmt: skip
            if name == "ram" and key is not None:
                self.prompt_cache.drop(key)
        return slot, "none"

    def stash(self, dec: Cells, slot: Slot) -> None:
        """Keep a free slot's cells in the prompt cache before they are replaced, unless
        another slot, a session or the cache already holds them for the same client."""
        held, owner = slot.cached, slot.owner
        if not self.prompt_cache.wants(held, owner):
            return
        if any(o is not slot and o.owner == owner and starts_with(o.cached, held)
               for o in dec.slots):  # fmt: skip
            return
        if self.sessions.covers(held, owner):
            return
        self.prompt_cache.put(list(held), dec.save(slot), owner)
