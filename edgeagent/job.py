"""One request inside the engine: the queued Job, its running state in a slot (Running),
the stop-string matcher, and the final events built from them."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edgeagent import protocol
from edgeagent.decoder import Slot
from edgeagent.protocol import Event, Request
from edgeagent.sessions import Conversation
from edgeagent.structured import InvalidAnswer, parse_answer


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
        # A grounded question: its session keeps the question as asked, not the passages,
        # and marks the turn private when a passage came from a private collection.
        self.remember: Optional[tuple[dict[str, str], ...]] = None
        self.private_turn = False

    def should_stop(self) -> Optional[str]:
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = protocol.TIMEOUT
        return self.stop_reason


class StopMatcher:
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


@dataclass
class Running:
    """A job holding a slot: its prompt, what it has produced, how it ends."""

    job: Job
    slot: Slot
    prompt: list[int]
    conv: Optional[Conversation]
    max_tokens: int
    started: float
    cached: int  # prompt tokens whose cells were reused
    cache: str  # where they came from: slot, session, prefix, none
    prefix_end: int  # prompt tokens that make the system prefix (snapshot when reached)
    prefix_owner: str  # whose that prefix is ("": the configured system prompt, everyone's)
    utf8: Any  # incremental UTF-8 decoder
    matcher: StopMatcher
    completion: list[int] = field(default_factory=list)
    next_token: Optional[int] = None  # sampled, not yet evaluated
    logprob_sum: float = 0.0
    first_at: Optional[float] = None
    prefill_s: float = 0.0
    peak_batch: int = 0  # most sequences in one decode step this job took part in

    def done_event(self, finish: str, end: float, node_id: str, model: str) -> Event:
        """The `done` event that ends this job's answer, finished at `end` (monotonic)."""
        job, req = self.job, self.job.request
        first_at = self.first_at or end
        decode_s = end - first_at
        n = len(self.completion)
        return protocol.done_event(
            req.id,
            self.matcher.text,
            source="local",
            node_id=node_id,
            finish_reason=finish,
            model=model,
            **({"session": req.session} if req.session else {}),
            **(
                {"confidence": {"mean_logprob": round(self.logprob_sum / n, 3)}}
                if job.want_confidence and n
                else {}
            ),
            usage={
                "prompt_tokens": len(self.prompt),
                "cached_tokens": self.cached,
                "evaluated_tokens": len(self.prompt) - self.cached,
                "cache": self.cache,
                "completion_tokens": n,
                "total_tokens": len(self.prompt) + n,
            },
            timings={
                "queue_ms": round((self.started - job.received) * 1000, 1),
                "ttft_ms": round((first_at - job.received) * 1000, 1),
                "prompt_ms": round((first_at - self.started) * 1000, 1),
                "total_ms": round((end - job.received) * 1000, 1),
                "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
                "peak_batch": self.peak_batch,
            },
        )

    def final_event(self, finish: str, end: float, node_id: str, model: str,
                    complete: bool = True) -> Event:  # fmt: skip
        """`done`, with the answer's JSON value as `json` when the request asked for one; or
        `incomplete` when max_tokens or a stop string cut the answer inside its structure
        (`complete`: the answer's grammar ended it, or would let it end where max_tokens cut
        it; a JSON answer is judged by parsing it as well)."""
        req = self.job.request
        done = self.done_event(finish, end, node_id, model)
        if req.constraint is None:
            return done
        kind = req.constraint.kind
        # Cut by max_tokens (or the context) before its grammar could end, an answer is
        # incomplete even where its text parses (`12` of `123`); cut by a stop string, a JSON
        # answer is judged by parsing it, a grammar's cannot be.
        cut = not complete and (finish != "stop" or kind == "grammar")
        value = None
        if not cut:
            try:
                value = parse_answer(req.constraint, self.matcher.text)
            except RecursionError:
                return self._failed(done, protocol.INVALID, "the answer is nested too deeply")
            except InvalidAnswer as exc:
                return self._failed(
                    done, protocol.INVALID, f"the answer does not fit the schema {exc}"
                )
            except ValueError as exc:  # not whole JSON
                if complete:  # its grammar was done: a rule let through what JSON does not
                    return self._failed(
                        done, protocol.INVALID, f"the answer is not valid JSON: {exc}"
                    )
                cut = True
        if cut:
            what = "max_tokens" if finish == "length" else f"the answer's end ({finish})"
            return self._failed(
                done, protocol.INCOMPLETE,
                f"{what} came before the answer's {kind} was complete",
            )  # fmt: skip
        if req.constraint.kind != "grammar":
            done["json"] = value
        return done

    def _failed(self, done: Event, code: str, message: str) -> Event:
        """The error that ends a structured answer instead of `done`, with its text and usage."""
        event = protocol.error_event(self.job.request.id, code, message)
        event["text"] = self.matcher.text
        event["usage"] = done["usage"]
        return event


def stopped_event(job: Job, partial: str, n_tokens: int) -> Event:
    """The `error` event of a job cancelled or past its deadline, with the text it had."""
    reason = job.stop_reason or protocol.CANCELLED
    what = "deadline passed" if reason == protocol.TIMEOUT else "cancelled"
    event = protocol.error_event(job.request.id, reason, f"{what} after {n_tokens} tokens")
    event["text"] = partial
    return event
