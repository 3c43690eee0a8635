"""OpenAI's HTTP API in edgeagent's terms: request bodies to protocol requests, events to
OpenAI's response objects and stream chunks, error codes to statuses (docs/http.md).

Pure functions and data: the server (http_server.py) does the I/O.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from edgeagent import protocol
from edgeagent.protocol import Event

# OpenAI caps `stop` at 4 sequences; edgeagent's protocol takes up to 8 of up to 64 characters.
MAX_STOP = 4
# What each error code is in HTTP: (status, OpenAI error type).
ERROR_STATUS = {
    protocol.BAD_REQUEST: (400, "invalid_request_error"),
    protocol.TOO_LONG: (400, "invalid_request_error"),
    # max_tokens ended the answer inside its JSON: the same request ends the same way.
    protocol.INCOMPLETE: (422, "invalid_request_error"),
    protocol.INVALID: (500, "server_error"),
    # The manuals hold nothing close to the question: asked again, the same.
    protocol.NOT_COVERED: (422, "invalid_request_error"),
    protocol.BUSY: (429, "rate_limit_error"),
    protocol.TIMEOUT: (504, "timeout_error"),
    protocol.CANCELLED: (503, "server_error"),
    protocol.INTERNAL: (500, "server_error"),
    protocol.CLOUD_ERROR: (502, "server_error"),
}
# OpenAI's name for a prompt that does not fit, which clients look for.
ERROR_CODE = {protocol.TOO_LONG: "context_length_exceeded"}
RETRY_AFTER_S = 1

# Parameters edgeagent takes as OpenAI defines them.
CHAT_FIELDS = {
    "messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "stop", "seed", "n", "user", "response_format",
}  # fmt: skip
COMPLETION_FIELDS = {
    "prompt", "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop",
    "seed", "n", "user", "response_format",
}  # fmt: skip
MAX_MODEL_CHARS = 256
# edgeagent's own, as extra body fields (docs/protocol.md).
OWN_FIELDS = {"escalate", "private", "session", "priority", "deadline_ms", "grammar", "kb"}
# OpenAI parameters that change nothing at these values; any other value asks for something
# edgeagent does not do, which must be an error rather than an answer that ignores it.
NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None,),
    "tool_choice": (None, "none", "auto"),
    "functions": (None,),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "modalities": (None,),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
# Accepted and not used: they describe the caller or OpenAI's own service.
IGNORED = {"metadata", "service_tier", "reasoning_effort", "verbosity", "prompt_cache_key",
           "safety_identifier", "web_search_options"}  # fmt: skip
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param,
        )  # fmt: skip
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "code": self.code,
                "param": self.param,
            }
        }  # fmt: skip

    @classmethod
    def from_event(cls, event: Event, stopping: bool = False) -> ApiError:
        """The HTTP error for an `error` event (`stopping`: the daemon is shutting down, so
        `busy` means "try another node", not "retry here")."""
        code = event.get("code", protocol.INTERNAL)
        status, type_ = ERROR_STATUS.get(code, (500, "server_error"))
        headers = {}
        if code == protocol.BUSY:
            if stopping:
                status, type_ = 503, "server_error"
            else:
                headers["Retry-After"] = str(RETRY_AFTER_S)
        elif code in (protocol.TIMEOUT, protocol.INTERNAL, protocol.CLOUD_ERROR,
                      protocol.INVALID):  # fmt: skip
            # The SDKs retry these by default: the same request would run (or fail) again.
            headers["x-should-retry"] = "false"
        message = str(event.get("message", ""))
        quoted = re.match(r"[^`]*`([A-Za-z_]+)`", message)
        param = quoted.group(1) if quoted and status == 400 else None
        return cls(status, message, type_, ERROR_CODE.get(code, code), param, headers)


@dataclass(frozen=True)
class Call:
    """What the front end needs beyond the protocol request to answer one API call."""

    kind: str  # "chat" or "text" (/v1/completions)
    stream: bool
    include_usage: bool
    model: str


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=protocol.BAD_REQUEST)


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(f"{where}: only text parts are supported", "messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}: a text part needs a string `text`", "messages")
            texts.append(text)
        return "".join(texts)
    raise _bad(f"{where}: `content` must be a string or a list of text parts", "messages")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("`messages` must be a non-empty list", "messages")
    if len(value) > protocol.MAX_MESSAGES:
        raise _bad(f"`messages` has more than {protocol.MAX_MESSAGES} entries", "messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object", "messages")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role must be one of {', '.join(ROLES)} (tools are not supported)",
                "messages",
            )
        if msg.get("tool_calls") or msg.get("function_call"):
            raise _bad(f"{where}: tool calls are not supported", "messages")
        out.append({"role": ROLES[role], "content": _text_of(msg.get("content"), where)})
    return out


def _check_neutral(body: dict[str, Any], allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in OWN_FIELDS or name in IGNORED:
            continue
        if name in NEUTRAL:
            neutral = NEUTRAL[name]
            if (
                value in neutral
                or (value == [] and name in ("tools", "functions"))
                or (name == "modalities" and value == ["text"])
            ):
                continue
            raise _bad(f"`{name}` is not supported by edgeagent (only its default)", name)
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise _bad(f"unrecognized request argument: `{shown}`", shown)


def _response_format(value: Any) -> dict[str, Any]:
    """The protocol's `format` for OpenAI's `response_format`."""
    if value is None or value == {"type": "text"}:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return {"format": "json"}
    if kind == "json_schema" and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        if (
            isinstance(spec, dict)
            and isinstance(spec.get("schema"), dict)
            and set(spec) <= {"name", "schema", "strict", "description"}
        ):
            return {"format": spec["schema"]}
        raise _bad("`response_format`: json_schema takes `name`, `schema` (an object), "
                   "`strict` and `description`", "response_format")  # fmt: skip
    raise _bad('`response_format` must be {"type": "text"}, {"type": "json_object"} or '
               '{"type": "json_schema", "json_schema": {...}}', "response_format")  # fmt: skip


def parse_call(body: Any, kind: str, rid: str, default_model: str) -> tuple[dict[str, Any], Call]:
    """(protocol request object, Call) for a /v1/chat/completions ("chat") or /v1/completions
    ("text") body; raises ApiError for what edgeagent cannot do as asked."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    _check_neutral(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS)
    request: dict[str, Any] = {"id": rid}
    if kind == "chat":
        request["messages"] = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("`prompt` must be a non-empty string (or a list of one)", "prompt")
        request["prompt"] = prompt
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_CHARS):
        raise _bad(f"`model` must be a string of at most {MAX_MODEL_CHARS} characters", "model")
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise _bad("`n` must be 1: edgeagent gives one answer per request", "n")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("`user` must be a string", "user")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("`stream` must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise _bad("`stream_options` takes only `include_usage`", "stream_options")
        include_usage = options.get("include_usage", False) is True
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    request.update(_response_format(body.get("response_format")))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP:
            raise _bad(f"`stop` must be a string or a list of up to {MAX_STOP} strings", "stop")
        request["stop"] = stop
    for name in ("temperature", "top_p", "seed", *sorted(OWN_FIELDS)):
        if body.get(name) is not None:
            request[name] = body[name]
    # Tokens are wanted as they come whether or not the client streams: a client that goes
    # away is noticed at the next one.
    request["stream"] = True
    # Answers name the model that served them, as OpenAI's do, whatever the client called it.
    return request, Call(kind, stream, include_usage, default_model)


# --- answers -------------------------------------------------------------------------------


def _finish(event: Event) -> str:
    return "length" if event.get("finish_reason") == "length" else "stop"


def usage_of(event: Event) -> dict[str, Any]:
    usage = event.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens", prompt + completion),
    }
    if "cached_tokens" in usage:
        out["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    return out


def extras(event: Event) -> dict[str, Any]:
    """edgeagent's own fields of an answer, beside OpenAI's."""
    out: dict[str, Any] = {
        k: event[k]
        for k in ("source", "escalation", "timings", "session", "citations")
        if k in event
    }
    if event.get("finish_reason") not in (None, "stop", "length"):
        out["edgeagent_finish_reason"] = event["finish_reason"]
    return out


def response(call: Call, rid: str, created: int, event: Event) -> dict[str, Any]:
    """The whole answer (`stream: false`) for a `done` event."""
    text = event.get("text", "")
    if call.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": _finish(event),
        }  # fmt: skip
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(event)}
        kind = "text_completion"
    return {
        "id": rid, "object": kind, "created": created, "model": event.get("model") or call.model,
        "choices": [choice], "usage": usage_of(event), **extras(event),
    }  # fmt: skip


def chunk(call: Call, rid: str, created: int, text: Optional[str] = None,
          finish: Optional[str] = None, **fields: Any) -> dict[str, Any]:  # fmt: skip
    """One stream chunk: a piece of text, or (with `finish`) the end of the choice."""
    if call.kind == "chat":
        delta = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}  # fmt: skip
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": call.model,
            "choices": [choice], **fields}  # fmt: skip


def role_chunk(call: Call, rid: str, created: int) -> Optional[dict[str, Any]]:
    """A chat stream opens with the assistant's role, as OpenAI's does."""
    if call.kind != "chat":
        return None
    opened = chunk(call, rid, created)
    opened["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return opened


def final_chunks(call: Call, rid: str, created: int, event: Event) -> list[dict[str, Any]]:
    """The chunks that end a stream after `done`: the finish reason with edgeagent's fields,
    then the usage when the client asked for it."""
    out = [chunk(call, rid, created, finish=_finish(event), **extras(event))]
    out[0]["model"] = event.get("model") or call.model
    if call.include_usage:
        usage = {"id": rid, "object": out[0]["object"], "created": created,
                 "model": out[0]["model"], "choices": [], "usage": usage_of(event)}  # fmt: skip
        out.append(usage)
    return out


def sse(data: Any) -> bytes:
    """One Server-Sent Event carrying `data` (JSON, or the literal [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def now() -> int:
    return int(time.time())
