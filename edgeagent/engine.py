"""The inference engine: one thread owns the model and decodes up to `parallel` requests at once.

Requests wait in a bounded priority queue, join the running batch between decode steps
(continuous batching) and leave it when done or cancelled. A newcomer's prompt is read in chunks
so the streams already decoding stall for at most one chunk. Prompt prefixes are reused from the
slot's own cells, another slot's cells (copied), a session's saved cells, or a snapshot of a
system prompt (kept in RAM and on disk, so it survives restarts).

Nothing here knows about sockets or MQTT. A Job carries a thread-safe `emit` callback; the
engine calls it with `token` events and exactly one final `done` or `error` event, unless the
job was taken off the queue before it started (then `cancel` returns True and the caller owns
the final event).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from edgeagent import heap, protocol
from edgeagent.config import Config
from edgeagent.cpu import Placement, pin_current_thread
from edgeagent.decoder import (
    TILED_MIN_ROWS,
    BatchDecoder,
    DecodeError,
    Slot,
    common_prefix,
    starts_with,
)
from edgeagent.promptcache import PromptCache
from edgeagent.protocol import Event, Request

log = logging.getLogger("edgeagent.engine")
# Copy another slot's cells when they hold at least this many more prompt tokens than the
# chosen slot has (a copy is about a millisecond; one token's evaluation is several).
COPY_MIN_TOKENS = 4


class EngineBusy(Exception):
    """The request queue is full."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


class Job:
    """One request inside the engine. `emit` must be safe to call from any thread."""

    def __init__(self, request: Request, emit: Callable[[Event], None], deadline: float,
                 client: Hashable = None, priority: int = 0, owner: str = "") -> None:  # fmt: skip
        self.request = request
        self.emit = emit
        self.deadline = deadline  # time.monotonic() value
        self.client = client  # where it came from: a socket connection, an MQTT reply topic
        # Who asked (a socket peer's uid, an MQTT reply topic): sessions and cached cells
        # belong to it.
        self.owner = owner
        self.priority = priority  # higher is served first
        self.received = time.monotonic()
        self.stop_reason: Optional[str] = None  # protocol.CANCELLED or protocol.TIMEOUT
        self.want_confidence = False  # add the answer's mean token log-probability to `done`

    def should_stop(self) -> Optional[str]:
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = protocol.TIMEOUT
        return self.stop_reason


# Marks a session message that came from (or answered) a private request: it is part of the
# conversation on the box and never part of what is sent to the cloud.
PRIVATE = "private"


def plain(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the chat template takes them (role and content only)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def shareable(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages that may leave the box: every one not marked private."""
    return plain([m for m in messages if PRIVATE not in m])


@dataclass
class _Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    kv_tokens: list[int] = field(default_factory=list)
    kv_state: Optional[bytes] = None


SessionKey = tuple[str, str]  # (owner, session name): one client's names are its own


class SessionStore:
    """Conversations kept for follow-ups: bounded in count, age, turns and saved-KV bytes.

    A conversation belongs to the client that started it: another client naming the same
    session gets a new one of its own, and cannot tell that the name is taken.
    """

    def __init__(self, max_sessions: int, max_turns: int, idle_s: float, kv_budget: int,
                 per_client: int = 1 << 30) -> None:  # fmt: skip
        self.max_sessions, self.max_turns, self.idle_s = max_sessions, max_turns, idle_s
        self.kv_budget, self.per_client = kv_budget, per_client
        self._items: collections.OrderedDict[SessionKey, _Conversation] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, owner: str, name: str) -> _Conversation:
        with self._lock:
            self._expire()
            conv = self._items.pop((owner, name), None) or _Conversation()
            conv.last_used = time.monotonic()
            self._items[owner, name] = conv
            mine = [key for key in self._items if key[0] == owner]
            for key in mine[: max(0, len(mine) - self.per_client)]:  # its own oldest first
                del self._items[key]
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
            return conv

    def messages(self, conv: _Conversation) -> list[dict[str, str]]:
        """A copy of a conversation's messages (the other thread may be adding a turn)."""
        with self._lock:
            return list(conv.messages)

    def drop(self, owner: str, name: str) -> bool:
        with self._lock:
            return self._items.pop((owner, name), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(len(c.kv_state or b"") for c in self._items.values())

    def covers(self, tokens: Sequence[int], owner: str) -> bool:
        """One of `owner`'s conversations has saved cells that hold these tokens (or more
        that start with them)."""
        with self._lock:
            self._expire()
            return any(
                starts_with(c.kv_tokens, tokens)
                for (who, _name), c in self._items.items()
                if who == owner
            )

    def commit(self, conv: _Conversation, new: list[dict[str, str]]) -> None:
        """Add a finished turn. A conversation reset meanwhile stays forgotten."""
        with self._lock:
            conv.messages.extend(new)
            turns = sum(1 for m in conv.messages if m["role"] == "user")
            while turns > self.max_turns and drop_oldest_turn(conv.messages):
                turns -= 1

    def store_kv(self, conv: _Conversation, tokens: list[int], state: bytes) -> None:
        with self._lock:
            if len(state) > self.kv_budget:
                return
            conv.kv_tokens, conv.kv_state = tokens, state
            total = sum(len(c.kv_state or b"") for c in self._items.values())
            for other in self._items.values():  # least recently used first
                if total <= self.kv_budget:
                    break
                if other is not conv and other.kv_state is not None:
                    total -= len(other.kv_state)
                    other.kv_state, other.kv_tokens = None, []

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, conv = next(iter(self._items.items()))
            if now - conv.last_used < self.idle_s:
                break
            del self._items[key]


def drop_oldest_turn(messages: list[dict[str, str]]) -> bool:
    """Remove the oldest user turn and the replies to it; system messages stay."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if start is None:
        return False
    end = start + 1
    while end < len(messages) and messages[end]["role"] != "user":
        end += 1
    del messages[start:end]
    return True


class _StopMatcher:
    """Holds back text that may be the start of a stop string, cuts at a full match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to send now, stop string reached)."""
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        window_start = max(0, self.sent - max(len(s) for s in self.stops))
        cut = min(
            (i for i in (self.text.find(s, window_start) for s in self.stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.text = self.text[:cut]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def answer_spans(
    messages: list[dict[str, str]], text: str, render: Callable[[list[dict[str, str]]], str]
) -> Optional[list[tuple[int, int]]]:
    """The byte spans of the assistant messages' texts in `text` (= render(messages)): the
    messages are rendered again with a marker in place of each, which shows where the
    template put them. None if the template changes them (no exact place)."""
    answers = [i for i, m in enumerate(messages)
               if m.get("role") == "assistant" and m.get("content")]  # fmt: skip
    if not answers:
        return []
    mark = f"\ue000{os.urandom(6).hex()}\ue001"
    marked = [dict(m, content=mark) if i in answers else m for i, m in enumerate(messages)]
    pieces = render(marked).split(mark)
    if len(pieces) != len(answers) + 1:
        return None
    spans, rebuilt, offset = [], [], 0
    for piece, i in zip(pieces, answers):
        content = messages[i]["content"]
        offset += len(piece.encode())
        spans.append((offset, offset + len(content.encode())))
        offset += len(content.encode())
        rebuilt += [piece, content]
    rebuilt.append(pieces[-1])
    return spans if "".join(rebuilt) == text else None


def auto_parallel(threads: int, n_ctx: int) -> int:
    """Slots when the config says 0: two per inference thread, at most 8, and at most 8,192
    KV cells in all (about 100 MB for the default model; with n_ctx 4096 that is 2 slots and
    keeps the daemon under 750 MB resident), at least one."""
    slots = min(8, max(2, 2 * threads))
    while slots > 1 and slots * n_ctx > 8192:
        slots -= 1
    return slots


def default_prefix_dir() -> Path:
    base = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if base:
        return Path(base) / "prefix"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeagent" / "prefix"


@dataclass
class _Prefix:
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
        self._items: dict[tuple[str, tuple[int, ...]], _Prefix] = {}
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

    def get(self, tokens: list[int], owner: str = "") -> Optional[_Prefix]:
        """The snapshot for exactly these tokens, from RAM or else from disk."""
        item = self._items.get((owner, tuple(tokens)))
        if item is None:
            item = self._read(tokens, owner)
            if item is not None:
                self._keep(item)
        if item is not None:
            item.last_used = time.monotonic()
        return item

    def add(self, tokens: list[int], state: bytes, owner: str = "") -> None:
        item = _Prefix(list(tokens), state, "computed", owner)
        if self._keep(item) and self.dir is not None:
            writer = threading.Thread(target=self._write, args=(item,), name="prefix-writer")
            writer.start()
            self._writers = [w for w in self._writers if w.is_alive()] + [writer]

    def flush(self, timeout: float = 10.0) -> None:
        for writer in self._writers:
            writer.join(timeout)

    def ram_bytes(self) -> int:
        # list(): status reads this on the event loop while the inference thread adds items.
        return sum(len(p.state) for p in list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def _keep(self, item: _Prefix) -> bool:
        if len(item.state) > self.budget:
            return False
        self._items[item.owner, tuple(item.tokens)] = item
        total = self.ram_bytes()
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

    def _read(self, tokens: list[int], owner: str) -> Optional[_Prefix]:
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
        return _Prefix(list(tokens), state, "disk", owner)

    def _write(self, item: _Prefix) -> None:
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


@dataclass
class _Active:
    """A job holding a slot: its prompt, what it has produced, how it ends."""

    job: Job
    slot: Slot
    prompt: list[int]
    conv: Optional[_Conversation]
    max_tokens: int
    started: float
    cached: int  # prompt tokens whose cells were reused
    cache: str  # where they came from: slot, session, prefix, none
    prefix_end: int  # prompt tokens that make the system prefix (snapshot when reached)
    prefix_owner: str  # whose that prefix is ("": the configured system prompt, everyone's)
    utf8: Any  # incremental UTF-8 decoder
    matcher: _StopMatcher
    completion: list[int] = field(default_factory=list)
    next_token: Optional[int] = None  # sampled, not yet evaluated
    logprob_sum: float = 0.0
    first_at: Optional[float] = None
    prefill_s: float = 0.0
    peak_batch: int = 0  # most sequences in one decode step this job took part in


class Engine:
    """Owns the model on one inference thread; `submit` and `cancel` may be called anywhere."""

    def __init__(self, cfg: Config, model_file: Path, model_name: str, model_sha256: str) -> None:
        self.cfg = cfg
        self.model_file, self.model_name, self.model_sha256 = model_file, model_name, model_sha256
        self.n_threads = 0
        self._warned_template = False
        self.parallel = 0
        self.placement: Optional[Placement] = None
        self.load_s = 0.0
        self.sessions = SessionStore(
            max_sessions=cfg.engine.max_sessions,
            max_turns=cfg.engine.session_max_turns,
            idle_s=cfg.engine.session_idle_s,
            kv_budget=cfg.engine.session_cache_mb << 20,
            per_client=cfg.engine.max_sessions_per_client,
        )
        where = cfg.engine.prefix_cache_dir
        prefix_dir = None if where == "off" else Path(where) if where else default_prefix_dir()
        self.prefixes = PrefixStore(
            prefix_dir,
            model_sha256, cfg.model.n_ctx, cfg.engine.prefix_cache_mb << 20,
            cfg.engine.prefix_cache_files, flash_attn=not cfg.engine.batch_invariant,
        )  # fmt: skip
        self.prompt_cache = PromptCache(cfg.engine.prompt_cache_mb << 20)
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._active: dict[int, _Active] = {}  # by slot sequence id
        self._per_client: collections.Counter[Hashable] = collections.Counter()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loaded = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._dec: Optional[BatchDecoder] = None
        self._formatter: Any = None
        self._prefix_ends: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._slot_used: dict[int, float] = {}
        self.last_progress = time.monotonic()  # for liveness: moves while the engine works
        self.system_prefix: Optional[dict[str, Any]] = None  # the configured prompt's snapshot

    # --- control, any thread --------------------------------------------------------------

    def start(self, placement: Placement) -> None:
        """Load the model on the inference thread; return once it is ready or raise."""
        self.placement = placement
        self.n_threads = placement.threads
        self.parallel = self.cfg.engine.parallel or auto_parallel(
            self.n_threads, self.cfg.model.n_ctx
        )
        self._thread = threading.Thread(target=self._main, name="inference", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped
            if len(self._queue) >= self.cfg.engine.queue_size:
                raise EngineBusy
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> bool:
        """Stop a job. True if it was still queued: it never ran and the caller answers it."""
        with self._cond:
            if job.stop_reason is None:
                job.stop_reason = reason
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            return True

    def stop(self, timeout: float = 10.0) -> list[Job]:
        """Stop taking work; running jobs end `cancelled`; return the queued ones (the
        caller answers them)."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.prefixes.flush()
        return left

    @property
    def thread_alive(self) -> bool:
        """The inference thread still runs (after stop(): stuck inside a llama.cpp call)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    def stalled_for(self) -> float:
        """Seconds the running requests have made no progress (0 when idle)."""
        if not self._active:
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

    def slots_status(self) -> dict[str, Any]:
        return {
            "parallel": self.parallel,
            "active": len(self._active),
            "max_per_client": self._client_cap(),
            "prefix_snapshots": len(self.prefixes),
            "prefix_mb": round(self.prefixes.ram_bytes() / 1e6, 1),
            "prefix_hits": dict(self.prefixes.hits),
            "prefix_rejected": self.prefixes.rejected,
            "prompt_cache": self.prompt_cache.stats(),
            **({"system_prefix": self.system_prefix} if self.system_prefix else {}),
        }

    def _client_cap(self) -> int:
        cap = self.cfg.engine.max_slots_per_client
        return cap if cap else max(1, self.parallel - 1)

    # --- helpers safe beside decoding -------------------------------------------------------

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        assert self._dec is not None
        result = self._formatter(messages=messages)
        return self._dec.tokenize(result.prompt, special=True, add_bos=not result.added_special)

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """The prompt's tokens, and for each whether it is the model's own words (inside the
        text of an assistant message as the template renders it): the decoder reads those
        the way it decodes (see edgeagent.decoder), when its kernels need it."""
        assert self._dec is not None
        result = self._formatter(messages=messages)
        tokens = self._dec.tokenize(result.prompt, special=True, add_bos=not result.added_special)
        if not self._dec.split_roles:
            return tokens, [False] * len(tokens)
        words = self._model_words(messages, result.prompt, tokens)
        # The last token, after which the model answers, goes with its words: then a prompt
        # whose cells are cached but for that token rides along with the decoding streams,
        # and the same token before this answer in a later prompt is read the same way.
        words[-1] = True
        return tokens, words

    def _model_words(self, messages: list[dict[str, str]], text: str,
                     tokens: list[int]) -> list[bool]:  # fmt: skip
        assert self._dec is not None
        spans = answer_spans(messages, text, lambda m: self._formatter(messages=m).prompt)
        if spans is None:
            if not self._warned_template:
                log.warning("the chat template changes assistant text: a conversation read "
                            "again may not give the cells its decoding gave")  # fmt: skip
                self._warned_template = True
            return [False] * len(tokens)
        return self._dec.inside(tokens, text.encode(), spans)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` (the vocabulary is read-only: safe beside a running generation)."""
        assert self._dec is not None
        return len(self._dec.tokenize(text, special=False))

    def shareable_history(self, owner: str, session: Optional[str]) -> list[dict[str, str]]:
        """The conversation so far that may leave the box (for a request answered by the
        cloud): private turns and the answers to them stay out."""
        if not session or not self.sessions.max_sessions:
            return []
        return shareable(self.sessions.messages(self.sessions.get(owner, session)))

    def record_turn(self, owner: str, session: Optional[str],
                    messages: tuple[dict[str, str], ...], answer: str) -> None:  # fmt: skip
        """Add a turn answered elsewhere to the conversation, so follow-ups see it."""
        if session and self.sessions.max_sessions:
            conv = self.sessions.get(owner, session)
            self.sessions.commit(conv, [*messages, {"role": "assistant", "content": answer}])

    # --- inference thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self.placement is not None:
                # Before the model exists: llama.cpp's worker threads inherit this affinity.
                pin_current_thread(self.placement.inference, "ea-inference")
            self._load()
        except BaseException as exc:
            self._load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        try:
            self._serve()
        finally:
            self._dec.close() if self._dec is not None else None

    def _serve(self) -> None:
        worked = False
        while True:
            if worked and not self._active and not self._queue:
                heap.trim()  # idle: hand the freed session buffers back to the kernel
                worked = False
            with self._cond:
                while not self._queue and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for active in self._active.values():
                        active.job.stop_reason = active.job.stop_reason or protocol.CANCELLED
                    if not self._active:
                        return
                starting = self._admit()
            for job in starting:
                self._start(job)
            if self._active:
                worked = True
                self._compact()
                self._step()

    def _admit(self) -> list[Job]:
        """Take queued jobs into free slots: highest priority first, oldest first within a
        priority, skipping clients at their slot cap. Called with the lock held."""
        free = self.parallel - len(self._active)
        cap = self._client_cap()
        taken: list[Job] = []
        counts = collections.Counter(self._per_client)
        for job in sorted(self._queue, key=lambda j: (-j.priority, j.received)):
            if free <= 0:
                break
            if counts[job.client] >= cap and job.client is not None:
                continue
            counts[job.client] += 1
            taken.append(job)
            free -= 1
        for job in taken:
            self._queue.remove(job)
        return taken

    def _load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

        t0 = time.monotonic()
        m = self.cfg.model
        self._dec = dec = BatchDecoder(
            self.model_file, n_ctx=m.n_ctx, n_slots=self.parallel, n_batch=m.n_batch,
            n_threads=self.n_threads, batch_invariant=self.cfg.engine.batch_invariant,
        )  # fmt: skip
        self.prefixes.kernels = dec.kernels  # before any snapshot is read or written
        meta = dec.model.metadata()
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{self.model_file} has no chat template in its metadata")
        eos, bos = dec.model.token_eos(), dec.model.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=dec.model.token_get_text(eos) if eos != -1 else "",
            bos_token=dec.model.token_get_text(bos) if bos != -1 else "",
        )
        # One decode now starts llama.cpp's worker threads (pinned like this one) and pages
        # the weights in, so the first request is as fast as the next ones.
        slot = dec.slots[0]
        dec.step([(slot, [bos if bos != -1 else eos], True)])
        dec.clear(slot)
        self.load_s = time.monotonic() - t0
        log.info(
            "model %s loaded in %.2f s (n_ctx %d per slot, %d slots, %d threads)",
            self.model_name, self.load_s, m.n_ctx, self.parallel, self.n_threads,
        )  # fmt: skip
        if m.system_prompt:
            self._prepare_system_prompt(m.system_prompt)

    def _prepare_system_prompt(self, text: str) -> None:
        """Load the configured system prompt's cells from disk, or compute and save them."""
        assert self._dec is not None
        t0 = time.monotonic()
        tokens = self._prefix_tokens([{"role": "system", "content": text}])
        if len(tokens) < PrefixStore.MIN_TOKENS:
            return
        item = self.prefixes.get(tokens)
        if item is None:
            slot = self._dec.slots[0]
            self._dec.clear(slot)
            slot.pending, slot.written = list(tokens), [False] * len(tokens)
            while slot.pending:
                chunk = min(len(slot.pending), self.cfg.model.n_batch)
                for _ in self._dec.steps([], [(slot, chunk, False)]):
                    pass
            self.prefixes.add(tokens, self._dec.save(slot))
            origin = "computed"
        else:
            origin = item.origin
        self.system_prefix = {
            "tokens": len(tokens),
            "origin": origin,
            "ms": round((time.monotonic() - t0) * 1000, 1),
        }
        log.info("system prompt: %d tokens, %s in %.0f ms", len(tokens), origin,
                 self.system_prefix["ms"])  # fmt: skip

    def _prefix_tokens(self, lead: list[dict[str, str]]) -> list[int]:
        """The tokens every prompt starting with `lead` (a system message, or nothing)
        begins with, under the model's chat template. Cached per system text."""
        key = lead[0]["content"] if lead else ""
        found = self._prefix_ends.get(key)
        if found is None:
            a = self.tokenize_chat([*lead, {"role": "user", "content": "a"}])
            b = self.tokenize_chat([*lead, {"role": "user", "content": "b"}])
            found = a[: common_prefix(a, b)]
            self._prefix_ends[key] = found
            while len(self._prefix_ends) > 64:
                self._prefix_ends.popitem(last=False)
        self._prefix_ends.move_to_end(key)
        return found

    def _build_prompt(
        self, job: Job, conv: Optional[_Conversation], max_tokens: int
    ) -> Optional[tuple[list[int], list[bool], list[dict[str, str]]]]:
        """Chat messages → tokens, dropping the oldest session turns until the answer fits."""
        req, n_ctx = job.request, self.cfg.model.n_ctx
        history = plain(self.sessions.messages(conv)) if conv else []
        new = list(req.messages)
        system = self.cfg.model.system_prompt
        has_system = any(m["role"] == "system" for m in history + new)
        prefix = [{"role": "system", "content": system}] if system and not has_system else []
        while True:
            messages = prefix + history + new
            tokens = self.tokenize_chat(messages)
            if len(tokens) + max_tokens <= n_ctx or not drop_oldest_turn(history):
                break
        if len(tokens) >= n_ctx:
            job.emit(
                protocol.error_event(
                    req.id,
                    protocol.TOO_LONG,
                    f"the prompt is {len(tokens)} tokens; the context window holds "
                    f"{n_ctx} tokens including the answer",
                )
            )
            return None
        return (*self.chat_prompt(messages), messages)

    def _start(self, job: Job) -> None:
        """Give a job a slot, reusing the longest cached start of its prompt."""
        req = job.request
        try:
            if job.should_stop():
                job.emit(self._stopped_event(job, "", 0))
                return
            max_tokens = req.max_tokens or self.cfg.model.max_tokens
            conv = (
                self.sessions.get(job.owner, req.session)
                if req.session and self.sessions.max_sessions
                else None
            )
            started = time.monotonic()
            built = self._build_prompt(job, conv, max_tokens)
            if built is None:
                return
            tokens, written, messages = built
            dec = self._dec
            assert dec is not None
            max_tokens = min(max_tokens, self.cfg.model.n_ctx - len(tokens))
            lead = messages[:1] if messages and messages[0]["role"] == "system" else []
            prefix = self._prefix_tokens(lead)
            prefix_end = len(prefix) if tokens[: len(prefix)] == prefix else 0
            if prefix_end < PrefixStore.MIN_TOKENS:
                prefix_end = 0
            # The configured system prompt is everyone's; a system message a client sent is
            # its own, and so is everything after the template's common start.
            configured = self._prefix_tokens(self._configured_lead())
            public = (
                len(tokens)
                if self.cfg.engine.share_prompt_cache
                else common_prefix(tokens, configured)
            )
            prefix_owner = "" if lead == self._configured_lead() else job.owner

            slot, cache = self._fill_slot(tokens, conv, prefix_end, job.owner, public,
                                          prefix_owner)  # fmt: skip
            kept = dec.reuse(slot, tokens, None if slot.owner == job.owner else public,
                             written)  # fmt: skip
            slot.owner = job.owner
            if kept == 0:
                cache = "none"
            dec.set_sampler(
                slot,
                self.cfg.model.temperature if req.temperature is None else req.temperature,
                seed=int.from_bytes(os.urandom(4), "little") if req.seed is None else req.seed,
                top_p=req.top_p,
            )
        except Exception as exc:
            log.exception("request %s failed to start", req.id)
            job.emit(protocol.error_event(req.id, protocol.INTERNAL, str(exc)))
            return
        self._slot_used[slot.seq] = time.monotonic()
        self._active[slot.seq] = _Active(
            job=job, slot=slot, prompt=tokens, conv=conv, max_tokens=max_tokens,
            started=started, cached=kept, cache=cache,
            prefix_end=prefix_end if kept < prefix_end else 0, prefix_owner=prefix_owner,
            utf8=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            matcher=_StopMatcher(req.stop),
        )  # fmt: skip
        with self._cond:
            self._per_client[job.client] += 1

    def _configured_lead(self) -> list[dict[str, str]]:
        system = self.cfg.model.system_prompt
        return [{"role": "system", "content": system}] if system else []

    def _fill_slot(
        self, tokens: list[int], conv: Optional[_Conversation], prefix_end: int, owner: str,
        public: int, prefix_owner: str,
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
        dec = self._dec
        assert dec is not None
        last = len(tokens) - 1  # one prompt token is always evaluated, for its logits
        used = self._slot_used

        def reach(held: Sequence[int], whose: str = owner) -> int:
            n = min(common_prefix(held, tokens), last)
            return n if whose == owner else min(n, public)

        def slot_reach(s: Slot) -> int:
            return reach(s.cached, s.owner)

        free = [s for s in dec.slots if s.seq not in self._active]
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
                self._stash(slot)
            return slot, "slot"
        self._stash(slot)  # all of its cells are replaced
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
                    self.prefixes.hits[name.removeprefix("prefix-")] += 1
                return slot, name
            log.warning("llama.cpp refused %d cached tokens (%s) for slot %d", len(held), name,
                        slot.seq)  # fmt: skip
            if name == "ram" and key is not None:
                self.prompt_cache.drop(key)
        return slot, "none"

    def _stash(self, slot: Slot) -> None:
        """Keep a free slot's cells in the prompt cache before they are replaced, unless
        another slot, a session or the cache already holds them for the same client."""
        dec, held, owner = self._dec, slot.cached, slot.owner
        assert dec is not None
        if not self.prompt_cache.wants(held, owner):
            return
        if any(o is not slot and o.owner == owner and starts_with(o.cached, held)
               for o in dec.slots):  # fmt: skip
            return
        if self.sessions.covers(held, owner):
            return
        self.prompt_cache.put(list(held), dec.save(slot), owner)

    def _compact(self) -> None:
        """Move running jobs to the lowest slots: llama.cpp evaluates the running streams in
        one pass only when their sequence ids are consecutive, else one pass per run of ids.
        The free slot's cells move the other way and stay a cache."""
        dec = self._dec
        assert dec is not None
        while True:
            top = max(self._active)
            hole = next((s for s in dec.slots if s.seq not in self._active), None)
            if hole is None or hole.seq > top:
                return
            a = self._active.pop(top)
            try:
                dec.swap(a.slot, hole)
            except Exception as exc:
                log.exception("could not move request %s to slot %d", a.job.request.id, hole.seq)
                a.job.emit(protocol.error_event(a.job.request.id, protocol.INTERNAL, str(exc)))
                dec.clear(a.slot)
                dec.clear(hole)
                self._active[top] = a
                self._release(a)
                continue
            used = self._slot_used
            used[top], used[hole.seq] = used.get(hole.seq, 0.0), used.get(top, 0.0)
            a.slot = hole
            self._active[hole.seq] = a

    def _step(self) -> None:
        """One step for every active slot: a token for each stream that is decoding, and one
        prompt chunk (a whole batch when nothing is decoding), plus the last few tokens of
        other prompts; in as many llama_decode calls as the kernels need (decoder.steps)."""
        assert self._dec is not None
        for active in list(self._active.values()):
            if active.job.should_stop():
                active.job.emit(
                    self._stopped_event(active.job, active.matcher.text, len(active.completion))
                )  # fmt: skip
                self._release(active)
        if not self._active:
            return
        n_batch = self.cfg.model.n_batch
        decoding = [(a.slot, a.next_token) for a in self._active.values()
                    if a.next_token is not None]  # fmt: skip
        reads: list[tuple[Slot, int, bool]] = []
        budget = min(n_batch - len(decoding),
                     self.cfg.engine.prefill_chunk if decoding else n_batch)  # fmt: skip
        prefilling: list[tuple[_Active, int]] = []
        reading = False  # this step already reads a prompt with more than a few tokens to go
        for a in sorted(self._active.values(), key=lambda a: a.started):
            if a.next_token is not None or budget <= 0:
                continue
            pending = a.slot.pending
            if len(pending) > COPY_MIN_TOKENS:
                if reading:
                    # One prompt per step, oldest first: newcomers that arrive together get
                    # their first tokens one after another instead of all at the end of one
                    # long step. Prompts served almost whole from a cache ride along.
                    continue
                reading = True
            take = min(len(pending), budget)
            words = a.slot.written
            if decoding and words and words[0] and self._dec.split_roles:
                # The model's words are read 7 rows per call: while others stream, one call
                # per step, so they wait no longer than for a decode step.
                take = min(take, TILED_MIN_ROWS - 1)
            elif decoding and True in words[:take]:
                # The prompt text up to them, in one call; and when all that is left after it
                # is a few of the model's words (the prompt's last token), those too: they go
                # into the decoding streams' call (decoder.steps).
                first = words.index(True)
                tail = len(pending) - first
                whole = take == len(pending) and tail < TILED_MIN_ROWS and all(words[first:])
                take = take if whole else first
            done_len = len(a.slot.cached)
            if a.prefix_end and done_len < a.prefix_end < done_len + take:
                take = a.prefix_end - done_len  # stop at the system prefix to snapshot it
            reads.append((a.slot, take, take == len(pending)))
            prefilling.append((a, take))
            budget -= take
        stepping = len(decoding) + len(reads)
        for slot in [s for s, _ in decoding] + [s for s, _, _ in reads]:
            self._active[slot.seq].peak_batch = max(self._active[slot.seq].peak_batch, stepping)
        t0 = time.monotonic()
        timed: set[int] = set()
        calls = self._dec.steps(decoding, reads)
        while True:
            try:
                ready = next(calls, None)
            except Exception as exc:
                failed_slots = exc.slots if isinstance(exc, DecodeError) else [
                    s for s, _ in decoding] + [s for s, _, _ in reads]  # fmt: skip
                log.exception("decode step failed for %d slots", len(failed_slots))
                for slot in failed_slots:
                    failed = self._active.get(slot.seq)
                    if failed is not None:
                        failed.job.emit(protocol.error_event(
                            failed.job.request.id, protocol.INTERNAL, str(exc)))  # fmt: skip
                        self._dec.clear(slot)
                        self._release(failed)
                break
            if ready is None:
                break
            now = time.monotonic()
            self.last_progress = now
            # Sampled now: the next call replaces these slots' logits.
            for slot in ready:
                sampled = self._active.get(slot.seq)
                if sampled is None or not sampled.slot.ready_to_sample:
                    continue
                if any(a is sampled for a, _ in prefilling):
                    sampled.prefill_s += now - t0  # before `done` may report it
                    timed.add(slot.seq)
                self._advance(sampled, now)
        now = time.monotonic()
        for a, _take in prefilling:
            if self._active.get(a.slot.seq) is not a:
                continue  # failed in this step
            if a.slot.seq not in timed:
                a.prefill_s += now - t0
            if a.prefix_end and len(a.slot.cached) == a.prefix_end:
                self.prefixes.add(a.prompt[: a.prefix_end], self._dec.save(a.slot),
                                  a.prefix_owner)  # fmt: skip
                a.prefix_end = 0

    def _advance(self, a: _Active, now: float) -> None:
        """Sample the slot's next token and stream it, or finish the job."""
        assert self._dec is not None
        dec, job, req = self._dec, a.job, a.job.request
        token = dec.sample(a.slot)
        if a.first_at is None:
            a.first_at = now
        if dec.is_eog(token):
            self._finish(a, "stop")
            return
        a.completion.append(token)
        if job.want_confidence:
            a.logprob_sum += dec.logprob(a.slot, token)
        piece, hit = a.matcher.feed(a.utf8.decode(dec.piece(token)))
        if piece and req.stream:
            job.emit(protocol.token_event(req.id, piece))
        if hit:
            self._finish(a, "stop")
        elif len(a.completion) >= a.max_tokens:
            self._finish(a, "length")
        else:
            a.next_token = token

    def _finish(self, a: _Active, finish: str) -> None:
        assert self._dec is not None
        job, req = a.job, a.job.request
        tail = a.matcher.feed(a.utf8.decode(b"", final=True))[0] + a.matcher.flush()
        if tail and req.stream:
            job.emit(protocol.token_event(req.id, tail))
        end = time.monotonic()
        first_at = a.first_at or end
        decode_s = end - first_at
        text = a.matcher.text
        n = len(a.completion)
        if a.conv is not None:
            # Before `done`: a client that reacts to it (follow-up, reset) sees the new turn.
            # A private turn stays marked, so that it never goes to the cloud with a later one.
            turn = [*req.messages, {"role": "assistant", "content": text}]
            if req.private:
                turn = [{**m, PRIVATE: "1"} for m in turn]
            self.sessions.commit(a.conv, turn)
        job.emit(
            protocol.done_event(
                req.id,
                text,
                source="local",
                node_id=self.cfg.node_id,
                finish_reason=finish,
                model=self.model_name,
                **({"session": req.session} if req.session else {}),
                **(
                    {"confidence": {"mean_logprob": round(a.logprob_sum / n, 3)}}
                    if job.want_confidence and n
                    else {}
                ),
                usage={
                    "prompt_tokens": len(a.prompt),
                    "cached_tokens": a.cached,
                    "evaluated_tokens": len(a.prompt) - a.cached,
                    "cache": a.cache,
                    "completion_tokens": n,
                    "total_tokens": len(a.prompt) + n,
                },
                timings={
                    "queue_ms": round((a.started - job.received) * 1000, 1),
                    "ttft_ms": round((first_at - job.received) * 1000, 1),
                    "prompt_ms": round((first_at - a.started) * 1000, 1),
                    "total_ms": round((end - job.received) * 1000, 1),
                    "tokens_per_s": round((n - 1) / decode_s, 2)
                    if n > 1 and decode_s > 0
                    else None,
                    "peak_batch": a.peak_batch,
                },
            )
        )
        if a.conv is not None and self.sessions.kv_budget:
            # After `done`, off the latency path. The last sampled token has no cells yet.
            self.sessions.store_kv(a.conv, list(a.slot.cached), self._dec.save(a.slot))
        self._release(a)

    def _release(self, a: _Active) -> None:
        """The slot is free again; its cells stay as a cache for a prompt that starts alike."""
        self._active.pop(a.slot.seq, None)
        a.slot.pending = []
        a.slot.written = []
        a.slot.logits_at = -1
        if self._dec is not None:
            self._dec.set_sampler(a.slot, None)
        with self._cond:
            self._per_client[a.job.client] -= 1
            if self._per_client[a.job.client] <= 0:
                del self._per_client[a.job.client]

    @staticmethod
    def _stopped_event(job: Job, partial: str, n_tokens: int) -> Event:
        reason = job.stop_reason or protocol.CANCELLED
        what = "deadline passed" if reason == protocol.TIMEOUT else "cancelled"
        event = protocol.error_event(job.request.id, reason, f"{what} after {n_tokens} tokens")
        event["text"] = partial
        return event
