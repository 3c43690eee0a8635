"""The inference engine: one thread owns the Llama model, serves a bounded queue, streams tokens.

Nothing here knows about sockets or MQTT. A Job carries a thread-safe `emit` callback; the
engine calls it with `token` events and exactly one final `done` or `error` event, unless the
job was taken off the queue before it started (then `cancel` returns True and the caller owns
the final event).
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from edgeagent import protocol
from edgeagent.config import Config
from edgeagent.cpu import Placement, pin_current_thread
from edgeagent.protocol import Request

log = logging.getLogger("edgeagent.engine")

Event = dict[str, Any]

# Sampling defaults shared with llama-cpp-python's chat completion, so that a request and the
# same request through raw llama-cpp-python sample the same way.
TOP_K, TOP_P, MIN_P, REPEAT_PENALTY = 40, 0.95, 0.05, 1.0


class EngineBusy(Exception):
    """The request queue is full."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


class Job:
    """One request inside the engine. `emit` must be safe to call from any thread."""

    def __init__(self, request: Request, emit: Callable[[Event], None], deadline: float) -> None:
        self.request = request
        self.emit = emit
        self.deadline = deadline  # time.monotonic() value
        self.received = time.monotonic()
        self.stop_reason: Optional[str] = None  # protocol.CANCELLED or protocol.TIMEOUT
        self.want_confidence = False  # add the answer's mean token log-probability to `done`

    def should_stop(self) -> Optional[str]:
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = protocol.TIMEOUT
        return self.stop_reason


@dataclass
class _Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    kv_tokens: list[int] = field(default_factory=list)
    kv_state: Optional[bytes] = None


class SessionStore:
    """Conversations kept for follow-ups: bounded in count, age, turns and saved-KV bytes."""

    def __init__(self, max_sessions: int, max_turns: int, idle_s: float, kv_budget: int) -> None:
        self.max_sessions, self.max_turns, self.idle_s = max_sessions, max_turns, idle_s
        self.kv_budget = kv_budget
        self._items: collections.OrderedDict[str, _Conversation] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> _Conversation:
        with self._lock:
            self._expire()
            conv = self._items.pop(name, None) or _Conversation()
            conv.last_used = time.monotonic()
            self._items[name] = conv
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
            return conv

    def drop(self, name: str) -> bool:
        with self._lock:
            return self._items.pop(name, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(len(c.kv_state or b"") for c in self._items.values())

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
            name, conv = next(iter(self._items.items()))
            if now - conv.last_used < self.idle_s:
                break
            del self._items[name]


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


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


class Engine:
    """Owns the model on one inference thread; `submit` and `cancel` may be called anywhere."""

    def __init__(self, cfg: Config, model_file: Path, model_name: str, model_sha256: str) -> None:
        self.cfg = cfg
        self.model_file, self.model_name, self.model_sha256 = model_file, model_name, model_sha256
        self.n_threads = 0
        self.placement: Optional[Placement] = None
        self.load_s = 0.0
        self.sessions = SessionStore(
            max_sessions=cfg.engine.max_sessions,
            max_turns=cfg.engine.session_max_turns,
            idle_s=cfg.engine.session_idle_s,
            kv_budget=cfg.engine.session_cache_mb << 20,
        )
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Optional[Job] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loaded = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._llm: Any = None
        self._formatter: Any = None
        self.last_progress = time.monotonic()  # for liveness: moves while the engine works

    # --- control, any thread --------------------------------------------------------------

    def start(self, placement: Placement) -> None:
        """Load the model on the inference thread; return once it is ready or raise."""
        self.placement = placement
        self.n_threads = placement.threads
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
        """Stop taking work; return the jobs still queued (the caller answers them)."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return left

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def stalled_for(self) -> float:
        """Seconds the running request has made no progress (0 when idle)."""
        if self._running is None:
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

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
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.last_progress = time.monotonic()
                self._running = job
            try:
                self._run(job)
            except Exception as exc:
                log.exception("request %s failed", job.request.id)
                job.emit(protocol.error_event(job.request.id, protocol.INTERNAL, str(exc)))
            finally:
                self._running = None
                self.last_progress = time.monotonic()

    def _load(self) -> None:
        from llama_cpp import Llama  # noqa: PLC0415 (heavy import, only where the model lives)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

        t0 = time.monotonic()
        m = self.cfg.model
        self._llm = Llama(
            model_path=str(self.model_file),
            n_ctx=m.n_ctx,
            n_batch=m.n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            verbose=False,
        )
        llm = self._llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{self.model_file} has no chat template in its metadata")
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )
        # One decode now starts llama.cpp's worker threads (pinned like this one) and pages
        # the weights in, so the first request is as fast as the next ones.
        llm.eval([bos if bos != -1 else eos])
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        self.load_s = time.monotonic() - t0
        log.info(
            "model %s loaded in %.2f s (n_ctx %d, %d threads)",
            self.model_name, self.load_s, m.n_ctx, self.n_threads,
        )  # fmt: skip

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        result = self._formatter(messages=messages)
        tokens: list[int] = self._llm.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens

    def _token_logprob(self, token: int) -> float:
        """log p(token) under the model's raw distribution at the position just sampled."""
        import llama_cpp  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        n_vocab = self._llm.n_vocab()
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._llm.ctx, -1), shape=(n_vocab,)
        )
        top = float(logits.max())
        return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` (the vocabulary is read-only: safe beside a running generation)."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def history(self, session: Optional[str]) -> list[dict[str, str]]:
        """The conversation so far (for a request answered elsewhere, e.g. by the cloud)."""
        if not session or not self.sessions.max_sessions:
            return []
        return list(self.sessions.get(session).messages)

    def record_turn(self, session: Optional[str], messages: tuple[dict[str, str], ...],
                    answer: str) -> None:  # fmt: skip
        """Add a turn answered elsewhere to the conversation, so follow-ups see it."""
        if session and self.sessions.max_sessions:
            conv = self.sessions.get(session)
            self.sessions.commit(conv, [*messages, {"role": "assistant", "content": answer}])

    def _is_eog(self, token: int) -> bool:
        import llama_cpp  # noqa: PLC0415

        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _save_kv(self) -> tuple[list[int], bytes]:
        import llama_cpp  # noqa: PLC0415

        ctx = self._llm.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        return self._llm._input_ids.tolist(), bytes(buf[:n])

    def _load_kv(self, tokens: list[int], state: bytes) -> bool:
        import llama_cpp  # noqa: PLC0415

        llm = self._llm
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(llm.ctx, buf, len(state), 0) != len(state):
            llm.n_tokens = 0
            return False
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        llm._requires_eval = True
        return True

    def _build_prompt(
        self, job: Job, conv: Optional[_Conversation], max_tokens: int
    ) -> Optional[list[int]]:
        """Chat messages → tokens, dropping the oldest session turns until the answer fits."""
        req, n_ctx = job.request, self.cfg.model.n_ctx
        history = list(conv.messages) if conv else []
        new = list(req.messages)
        system = self.cfg.model.system_prompt
        has_system = any(m["role"] == "system" for m in history + new)
        prefix = [{"role": "system", "content": system}] if system and not has_system else []
        while True:
            tokens = self.tokenize_chat(prefix + history + new)
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
        return tokens

    def _run(self, job: Job) -> None:
        req, llm = job.request, self._llm
        if job.should_stop():
            job.emit(self._stopped_event(job, "", 0))
            return
        max_tokens = req.max_tokens or self.cfg.model.max_tokens
        temperature = self.cfg.model.temperature if req.temperature is None else req.temperature
        conv = (
            self.sessions.get(req.session) if req.session and self.sessions.max_sessions else None
        )
        started = time.monotonic()
        tokens = self._build_prompt(job, conv, max_tokens)
        if tokens is None:
            return
        max_tokens = min(max_tokens, self.cfg.model.n_ctx - len(tokens))
        current = llm._input_ids.tolist()
        if conv and conv.kv_state is not None:
            saved = common_prefix(conv.kv_tokens, tokens)
            if saved > common_prefix(current, tokens) and self._load_kv(
                conv.kv_tokens, conv.kv_state
            ):
                current = conv.kv_tokens
        reused = common_prefix(current, tokens)
        cached = reused - 1 if reused == len(tokens) else reused  # generate() replays one

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = _StopMatcher(req.stop)
        completion: list[int] = []
        logprob_sum = 0.0
        first_at: Optional[float] = None
        finish = "length"
        gen = llm.generate(
            tokens, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P, temp=temperature,
            repeat_penalty=REPEAT_PENALTY,
        )  # fmt: skip
        try:
            for token in gen:
                now = time.monotonic()
                self.last_progress = now
                if first_at is None:
                    first_at = now
                if self._is_eog(token):
                    finish = "stop"
                    break
                completion.append(token)
                if job.want_confidence:
                    logprob_sum += self._token_logprob(token)
                piece, hit = matcher.feed(decoder.decode(llm.detokenize([token])))
                if piece and req.stream:
                    job.emit(protocol.token_event(req.id, piece))
                if hit:
                    finish = "stop"
                    break
                if job.should_stop():
                    job.emit(self._stopped_event(job, matcher.text, len(completion)))
                    return
                if len(completion) >= max_tokens:
                    break
        finally:
            gen.close()
        tail = matcher.feed(decoder.decode(b"", final=True))[0] + matcher.flush()
        if tail and req.stream:
            job.emit(protocol.token_event(req.id, tail))
        end = time.monotonic()
        first_at = first_at or end
        decode_s = end - first_at
        text = matcher.text
        if conv is not None:
            # Before `done`: a client that reacts to it (follow-up, reset) sees the new turn.
            self.sessions.commit(conv, [*req.messages, {"role": "assistant", "content": text}])
        job.emit(
            {
                "event": "done",
                "id": req.id,
                "text": text,
                "source": "local",
                "node_id": self.cfg.node_id,
                "finish_reason": finish,
                "model": self.model_name,
                **({"session": req.session} if req.session else {}),
                **(
                    {"confidence": {"mean_logprob": round(logprob_sum / len(completion), 3)}}
                    if job.want_confidence and completion
                    else {}
                ),
                "usage": {
                    "prompt_tokens": len(tokens),
                    "cached_tokens": cached,
                    "completion_tokens": len(completion),
                    "total_tokens": len(tokens) + len(completion),
                },
                "timings": {
                    "queue_ms": round((started - job.received) * 1000, 1),
                    "ttft_ms": round((first_at - job.received) * 1000, 1),
                    "prompt_ms": round((first_at - started) * 1000, 1),
                    "total_ms": round((end - job.received) * 1000, 1),
                    "tokens_per_s": round((len(completion) - 1) / decode_s, 2)
                    if len(completion) > 1 and decode_s > 0
                    else None,
                },
            }
        )
        if conv is not None and self.sessions.kv_budget:
            self.sessions.store_kv(conv, *self._save_kv())  # after `done`: off the latency path

    @staticmethod
    def _stopped_event(job: Job, partial: str, n_tokens: int) -> Event:
        reason = job.stop_reason or protocol.CANCELLED
        what = "deadline passed" if reason == protocol.TIMEOUT else "cancelled"
        event = protocol.error_event(job.request.id, reason, f"{what} after {n_tokens} tokens")
        event["text"] = partial
        return event
