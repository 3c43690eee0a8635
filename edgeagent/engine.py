"""The inference engine: one thread owns the model and decodes up to `parallel` requests at once.

Requests wait in a bounded priority queue, join the running batch between decode steps
(continuous batching) and leave it when done or cancelled. A newcomer's prompt is read in chunks
so the streams already decoding stall for at most one chunk. Prompt prefixes are reused from the
slot's own cells, another slot's cells (copied), a session's saved cells, or a snapshot of a
system prompt (kept in RAM and on disk, so it survives restarts).

The objects it drives live beside it: job.py (a request queued and running, its stop
strings, its final events), sessions.py (conversations), kvreuse.py (which slot a prompt
takes, and where its cached cells come from).

Nothing here knows about sockets or MQTT. A Job carries a thread-safe `emit` callback; the
engine calls it with `token` events and exactly one final `done` or `error` event, unless the
job was taken off the queue before it started (then `cancel` returns True and the caller owns
the final event).
"""

from __future__ import annotations

import codecs
import collections
import logging
import os
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Callable, Optional

from edgeagent import heap, protocol
from edgeagent.config import Config
from edgeagent.cpu import Placement, pin_current_thread
from edgeagent.decoder import (
    TILED_MIN_ROWS,
    BatchDecoder,
    DecodeError,
    GrammarError,
    Slot,
    common_prefix,
)
from edgeagent.job import Job, Running, StopMatcher, stopped_event
from edgeagent.kvreuse import COPY_MIN_TOKENS, KvReuse, PrefixStore, default_prefix_dir
from edgeagent.promptcache import PromptCache
from edgeagent.sessions import (
    PRIVATE,
    Conversation,
    SessionStore,
    drop_oldest_turn,
    plain,
    shareable,
)

log = logging.getLogger("edgeagent.engine")


class EngineBusy(Exception):
    """The request queue is full."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


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
        self.kv = KvReuse(self.prefixes, self.prompt_cache, self.sessions)
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._active: dict[int, Running] = {}  # by slot sequence id
        self._per_client: collections.Counter[Hashable] = collections.Counter()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loaded = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._dec: Optional[BatchDecoder] = None
        self._formatter: Any = None
        self._prefix_ends: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
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
            **self.prefixes.stats(),
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
        self, job: Job, conv: Optional[Conversation], max_tokens: int
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
                job.emit(stopped_event(job, "", 0))
                return
            max_tokens = req.max_tokens or self.cfg.model.max_tokens
            conv = (
                self.sessions.get(job.owner, req.session)
                if req.session and self.sessions.max_sessions
                else None
            )
            started = time.monotonic()
            grammar = None
            if req.constraint is not None:
                try:  # parsed before a slot is touched; set_sampler clones it
                    grammar = self._dec.compile_grammar(req.constraint.gbnf)  # type: ignore[union-attr]
                except GrammarError as exc:
                    field = "grammar" if req.constraint.kind == "grammar" else "format"
                    job.emit(protocol.error_event(req.id, protocol.BAD_REQUEST,
                                                  f"`{field}`: {exc}"))  # fmt: skip
                    return
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

            slot, cache = self.kv.fill(dec, self._active, tokens, conv, prefix_end, job.owner,
                                       public, prefix_owner)  # fmt: skip
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
                grammar=grammar,
            )
        except Exception as exc:
            log.exception("request %s failed to start", req.id)
            job.emit(protocol.error_event(req.id, protocol.INTERNAL, str(exc)))
            return
        self.kv.took(slot.seq)
        self._active[slot.seq] = Running(
            job=job, slot=slot, prompt=tokens, conv=conv, max_tokens=max_tokens,
            started=started, cached=kept, cache=cache,
            prefix_end=prefix_end if kept < prefix_end else 0, prefix_owner=prefix_owner,
            utf8=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            matcher=StopMatcher(req.stop),
        )  # fmt: skip
        with self._cond:
            self._per_client[job.client] += 1

    def _configured_lead(self) -> list[dict[str, str]]:
        system = self.cfg.model.system_prompt
        return [{"role": "system", "content": system}] if system else []

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
            self.kv.swapped(top, hole.seq)
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
                    stopped_event(active.job, active.matcher.text, len(active.completion))
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
        prefilling: list[tuple[Running, int]] = []
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

    def _advance(self, a: Running, now: float) -> None:
        """Sample the slot's next token and stream it, or finish the job. A failure here is
        this job's alone: it gets an `internal` error and its slot, the others go on."""
        try:
            self._sample_and_stream(a, now)
        except Exception as exc:
            log.exception("request %s failed while sampling", a.job.request.id)
            if self._active.get(a.slot.seq) is a:
                a.job.emit(protocol.error_event(a.job.request.id, protocol.INTERNAL, str(exc)))
                self._release(a)

    def _sample_and_stream(self, a: Running, now: float) -> None:
        assert self._dec is not None
        dec, job, req = self._dec, a.job, a.job.request
        token = dec.sample(a.slot)
        if a.first_at is None:
            a.first_at = now
        if dec.is_eog(token):
            self._finish(a, "stop", eog=True)
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

    def _finish(self, a: Running, finish: str, eog: bool = False) -> None:
        assert self._dec is not None
        job, req = a.job, a.job.request
        tail = a.matcher.feed(a.utf8.decode(b"", final=True))[0] + a.matcher.flush()
        if tail and req.stream:
            job.emit(protocol.token_event(req.id, tail))
        end = time.monotonic()
        text = a.matcher.text
        # An answer its grammar ended is complete; one cut by max_tokens is when the grammar
        # would let it end there. A stop string cuts the text inside a token the grammar took,
        # so that text is not known to be whole (a JSON answer's may still parse).
        cut_by_stop = finish == "stop" and not eog
        complete = eog or (not cut_by_stop and self._dec.grammar_complete(a.slot))
        final = a.final_event(finish, end, self.cfg.node_id, self.model_name, complete)
        answered = final["event"] == "done"  # not a structured answer cut short or invalid
        if a.conv is not None and answered:
            # Before `done`: a client that reacts to it (follow-up, reset) sees the new turn.
            # A private turn stays marked, so that it never goes to the cloud with a later one.
            asked = req.messages if job.remember is None else job.remember
            turn = [*asked, {"role": "assistant", "content": text}]
            if req.private or job.private_turn:
                turn = [{**m, PRIVATE: "1"} for m in turn]
            self.sessions.commit(a.conv, turn)
        job.emit(final)
        if a.conv is not None and answered and self.sessions.kv_budget:
            # After `done`, off the latency path. The last sampled token has no cells yet.
            self.sessions.store_kv(a.conv, list(a.slot.cached), self._dec.save(a.slot))
        self._release(a)

    def _release(self, a: Running) -> None:
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
