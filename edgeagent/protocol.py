"""The request/reply vocabulary shared by every front end: parsing, validation, the events a
request gets and their builders.

See docs/protocol.md. Parsing never raises anything but ProtocolError, whose `code` and
`request_id` go straight into the `error` event the caller gets. A front end that speaks
another wire format (HTTP's OpenAI API) translates to and from these, so that every front end
means the same by a request and its answer (edgeagent/transport.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from edgeagent.structured import DEFAULT_LIMITS, Constraint, Limits, constraint_of

MAX_ID_LEN = 128
MAX_MESSAGES = 256
# Error messages quote this much of what a client sent, so they never grow with the input.
MAX_QUOTED_CHARS = 40
MAX_QUOTED_NAMES = 5
ROLES = ("system", "user", "assistant")

# Error codes, one place. A client may rely on these strings.
BAD_REQUEST = "bad_request"
BUSY = "busy"
TOO_LONG = "too_long"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
INTERNAL = "internal"
CLOUD_ERROR = "cloud_error"  # the cloud model could not answer an escalation
INCOMPLETE = "incomplete"  # max_tokens (or a stop string) cut a structured answer short
INVALID = "invalid"  # a whole JSON answer that its schema does not allow
NOT_COVERED = "not_covered"  # a structured question the manuals do not cover (`kb`)
ERROR_CODES = (
    BAD_REQUEST,
    BUSY,
    TOO_LONG,
    TIMEOUT,
    CANCELLED,
    INTERNAL,
    CLOUD_ERROR,
    INCOMPLETE,
    INVALID,
    NOT_COVERED,
)

REQUEST_FIELDS = {
    "id", "messages", "prompt", "session", "max_tokens", "temperature", "top_p", "seed",
    "stream", "deadline_ms", "stop", "escalate", "private", "priority", "format", "grammar",
    "kb",
}  # fmt: skip
MAX_KB_COLLECTIONS = 16
MAX_SEED = 2**32 - 2  # llama.cpp takes 2**32 - 1 as "pick a random seed"

# The events a request gets: any number of `token` (and `restart`, which voids the tokens
# before it), then exactly one final event carrying its id.
Event = dict[str, Any]
FINAL_EVENTS = ("done", "error")
OPS = {
    "status": {"op"},
    "cancel": {"op", "id"},
    "reset": {"op", "session"},
    "result": {"op", "id"},
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[dict[str, str], ...]
    session: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None  # nucleus sampling bound (with temperature > 0)
    seed: Optional[int] = None  # the random draw's seed: the same answer for the same request
    stream: bool = True
    deadline_ms: Optional[int] = None
    stop: tuple[str, ...] = ()
    escalate: Optional[bool] = None  # True: ask the cloud model; False: never
    private: bool = False  # never leaves the box (no escalation, whatever the rules say)
    priority: Optional[int] = None  # higher is served first; None: the transport's default
    constraint: Optional[Constraint] = None  # `format` or `grammar`: what the answer must be
    # `kb`: answer from the manuals (True: every collection; names: those); None: the front
    # end's default ([kb] front_ends)
    kb: Union[bool, tuple[str, ...], None] = None


@dataclass(frozen=True)
class Op:
    op: str
    id: Optional[str] = None
    session: Optional[str] = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(data: Union[bytes, str]) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate-key ambiguity."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(BAD_REQUEST, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def request_id_of(obj: dict[str, Any]) -> Optional[str]:
    """The request's id if it is a valid one, for error events about an invalid request."""
    rid = obj.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN else None


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _names(names: set[str]) -> str:
    """Some of the unknown field names a client sent, for an error message."""
    ordered = sorted(names)
    shown = ", ".join(_shorten(n) for n in ordered[:MAX_QUOTED_NAMES])
    more = len(ordered) - MAX_QUOTED_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _check_id(obj: dict[str, Any], what: str = "id") -> str:
    rid = obj.get(what)
    if not isinstance(rid, str) or not rid:
        raise ProtocolError(BAD_REQUEST, f"`{what}` must be a non-empty string")
    if len(rid) > MAX_ID_LEN:
        raise ProtocolError(BAD_REQUEST, f"`{what}` is longer than {MAX_ID_LEN} characters")
    return rid


def parse(obj: Any, *, max_tokens_limit: int,
          limits: Limits = DEFAULT_LIMITS) -> Union[Request, Op]:  # fmt: skip
    """Validate a decoded JSON value as a request or a control op; `limits` bound its
    `format` and `grammar`."""
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a request must be a JSON object")
    if "op" in obj:
        return _parse_op(obj)
    rid = request_id_of(obj)
    try:
        return _parse_request(obj, max_tokens_limit, limits)
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _parse_op(obj: dict[str, Any]) -> Op:
    op = obj["op"]
    if not isinstance(op, str) or op not in OPS:
        # Not repr() of the value: a deeply nested one would overflow the stack.
        what = repr(_shorten(op)) if isinstance(op, str) else f"of type {type(op).__name__}"
        raise ProtocolError(
            BAD_REQUEST, f"unknown op {what}; known: {', '.join(OPS)}", request_id_of(obj)
        )
    unknown = set(obj) - OPS[op]
    if unknown:
        raise ProtocolError(
            BAD_REQUEST, f"unknown field(s) for op {op}: {_names(unknown)}", request_id_of(obj)
        )
    if op in ("cancel", "result"):
        return Op(op, id=_check_id(obj))
    if op == "reset":
        return Op(op, session=_check_id(obj, "session"))
    return Op(op)


def _parse_request(obj: dict[str, Any], max_tokens_limit: int, limits: Limits) -> Request:
    unknown = set(obj) - REQUEST_FIELDS
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field(s): {_names(unknown)}")
    rid = _check_id(obj)
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages == has_prompt:
        raise ProtocolError(BAD_REQUEST, "give exactly one of `messages` or `prompt`")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolError(BAD_REQUEST, "`prompt` must be a non-empty string")
        messages: tuple[dict[str, str], ...] = ({"role": "user", "content": prompt},)
    else:
        messages = _parse_messages(obj["messages"])
    session = None
    if "session" in obj:
        session = _check_id(obj, "session")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit
    ):
        raise ProtocolError(
            BAD_REQUEST, f"`max_tokens` must be an integer from 1 to {max_tokens_limit}"
        )
    temperature = obj.get("temperature")
    if temperature is not None:
        # The range check also refuses NaN and infinities, and unlike math.isfinite it takes
        # integers of any size.
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0.0 <= temperature <= 2.0
        ):
            raise ProtocolError(BAD_REQUEST, "`temperature` must be a number from 0 to 2")
        temperature = float(temperature)
    top_p = obj.get("top_p")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ProtocolError(BAD_REQUEST, "`top_p` must be a number above 0, at most 1")
        top_p = float(top_p)
    seed = obj.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ProtocolError(BAD_REQUEST, f"`seed` must be an integer from 0 to {MAX_SEED}")
    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise ProtocolError(BAD_REQUEST, "`stream` must be true or false")
    deadline_ms = obj.get("deadline_ms")
    if deadline_ms is not None and (not _is_int(deadline_ms) or not 1 <= deadline_ms <= 86_400_000):
        raise ProtocolError(BAD_REQUEST, "`deadline_ms` must be an integer from 1 to 86400000")
    stop = obj.get("stop", [])
    if (
        not isinstance(stop, list)
        or len(stop) > 8
        or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop)
    ):
        raise ProtocolError(BAD_REQUEST, "`stop` must be a list of up to 8 non-empty strings")
    escalate = obj.get("escalate")
    if escalate is not None and not isinstance(escalate, bool):
        raise ProtocolError(BAD_REQUEST, "`escalate` must be true or false")
    private = obj.get("private", False)
    if not isinstance(private, bool):
        raise ProtocolError(BAD_REQUEST, "`private` must be true or false")
    priority = obj.get("priority")
    if priority is not None and (not _is_int(priority) or not -100 <= priority <= 100):
        raise ProtocolError(BAD_REQUEST, "`priority` must be an integer from -100 to 100")
    try:
        constraint = constraint_of(obj.get("format"), obj.get("grammar"), limits)
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc)) from None
    kb = obj.get("kb")
    if isinstance(kb, list):
        if (
            not kb
            or len(kb) > MAX_KB_COLLECTIONS
            or not all(isinstance(c, str) and 0 < len(c) <= 64 for c in kb)
        ):
            raise ProtocolError(
                BAD_REQUEST,
                f"`kb` must be true, false or a list of 1 to {MAX_KB_COLLECTIONS} collection names",
            )
        kb = tuple(kb)
    elif kb is not None and not isinstance(kb, bool):
        raise ProtocolError(BAD_REQUEST, "`kb` must be true, false or a list of collection names")
    if constraint is not None and constraint.kind == "grammar" and escalate:
        # The cloud's model servers take JSON Schemas alike (response_format), not GBNF.
        raise ProtocolError(
            BAD_REQUEST, "`escalate` cannot go with `grammar`: a grammar's answer is made on "
            "this box (`format` with a JSON Schema can be escalated)",
        )  # fmt: skip
    return Request(
        id=rid,
        constraint=constraint,
        messages=messages,
        session=session,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=stream,
        deadline_ms=deadline_ms,
        stop=tuple(stop),
        escalate=escalate,
        private=private,
        priority=priority,
        kb=kb,
    )


def _parse_messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(BAD_REQUEST, "`messages` must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise ProtocolError(BAD_REQUEST, f"`messages` has more than {MAX_MESSAGES} entries")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise ProtocolError(
                BAD_REQUEST, f"messages[{i}] must be an object with exactly `role` and `content`"
            )
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ProtocolError(BAD_REQUEST, f"messages[{i}].role must be one of {ROLES}")
        if not isinstance(content, str):
            raise ProtocolError(BAD_REQUEST, f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ProtocolError(BAD_REQUEST, "the last message must have role `user`")
    return tuple(out)


# --- events -----------------------------------------------------------------------------------


def token_event(rid: str, text: str) -> Event:
    return {"event": "token", "id": rid, "text": text}


def restart_event(rid: str, reason: str) -> Event:
    """The tokens streamed so far for `rid` are void; the answer starts again."""
    return {"event": "restart", "id": rid, "reason": reason}


def error_event(rid: Optional[str], code: str, message: str) -> Event:
    return {"event": "error", "id": rid, "code": code, "message": message}


def done_event(rid: str, text: str, *, source: str, node_id: str, finish_reason: str,
               **fields: Any) -> Event:  # fmt: skip
    """A request's answer. `source`: "local", "cloud" or "queued" (the cloud's answer comes
    later as a `cloud_answer`); `fields` add model, session, usage, timings, escalation."""
    return {
        "event": "done", "id": rid, "text": text, "source": source, "node_id": node_id,
        "finish_reason": finish_reason, **fields,
    }  # fmt: skip


def encode(event: Event) -> bytes:
    """One JSON line. ensure_ascii keeps the wire 7-bit clean for simple terminal clients."""
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
