"""Which requests go to the cloud model and why, and what of them may leave the box: pure rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from edgeagent.config import EscalationConfig
from edgeagent.protocol import Request


@dataclass(frozen=True)
class Reason:
    """Why a request is escalated: `rule` is the kind, `detail` what matched."""

    rule: str  # flag, topic, keyword, pattern, prompt_tokens, low_confidence
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.rule, **({"rule": self.detail} if self.detail else {})}


@dataclass(frozen=True)
class Rules:
    keywords: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    min_prompt_tokens: int = 0
    deep_topic: bool = False
    low_confidence: bool = False
    min_mean_logprob: float = -1.0
    redactions: tuple[tuple[re.Pattern[str], str], ...] = ()

    @classmethod
    def from_config(cls, cfg: EscalationConfig) -> Rules:
        return cls(
            keywords=tuple(k.lower() for k in cfg.keywords),
            patterns=tuple(re.compile(p) for p in cfg.patterns),
            min_prompt_tokens=cfg.min_prompt_tokens,
            deep_topic=cfg.deep_topic,
            low_confidence=cfg.low_confidence,
            min_mean_logprob=cfg.min_mean_logprob,
            redactions=tuple((re.compile(p), r) for p, r in cfg.redact),
        )


def may_leave_the_box(req: Request) -> bool:
    """`private: true` or `escalate: false` keep a request local, whatever the rules say; so
    does a raw `grammar` (model servers take JSON Schemas, not GBNF). A `format` goes along
    to the cloud, and the cloud's answer is checked against it at the edge."""
    structured_here = req.constraint is not None and req.constraint.kind == "grammar"
    return not req.private and req.escalate is not False and not structured_here


def request_text(req: Request) -> str:
    """The text the rules look at: the request's own messages, not the session's history."""
    return "\n".join(m["content"] for m in req.messages)


def before_answer(
    req: Request, rules: Rules, *, via_deep_topic: bool, count_tokens: Callable[[str], int]
) -> Optional[Reason]:
    """Escalate instead of answering locally? The first rule that fires, in a fixed order."""
    if not may_leave_the_box(req):
        return None
    if req.escalate:
        return Reason("flag")
    if via_deep_topic and rules.deep_topic:
        return Reason("topic")
    text = request_text(req)
    lowered = text.lower()
    for keyword in rules.keywords:
        if keyword in lowered:
            return Reason("keyword", keyword)
    for pattern in rules.patterns:
        if pattern.search(text):
            return Reason("pattern", pattern.pattern)
    # A token is at least one byte: shorter texts need no tokenizer.
    n = rules.min_prompt_tokens
    if n and len(text.encode()) >= n and count_tokens(text) >= n:
        return Reason("prompt_tokens", f">= {n}")
    return None


def after_answer(req: Request, rules: Rules, mean_logprob: Optional[float]) -> Optional[Reason]:
    """Ask the cloud for a second opinion on a local answer the model was unsure of?"""
    if not rules.low_confidence or mean_logprob is None or not may_leave_the_box(req):
        return None
    if mean_logprob < rules.min_mean_logprob:
        detail = f"mean logprob {mean_logprob:.2f} < {rules.min_mean_logprob}"
        return Reason("low_confidence", detail)
    return None


def redact(text: str, rules: Rules) -> str:
    for pattern, placeholder in rules.redactions:
        text = pattern.sub(placeholder, text)
    return text


def redact_value(value: Any, rules: Rules) -> Any:
    """A JSON value (a request's schema) with the redaction rules applied to every string in
    it, keys aside: a schema's `enum`, `const`, `description` and `examples` go to the cloud
    too. (A redacted `enum` the cloud then answers from fails the check at the edge, and the
    local answer stands.)"""
    if isinstance(value, str):
        return redact(value, rules)
    if isinstance(value, list):
        return [redact_value(v, rules) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, rules) for k, v in value.items()}
    return value


def redact_messages(messages: list[dict[str, str]], rules: Rules) -> list[dict[str, str]]:
    """What is sent to the cloud: every message with the redaction rules applied."""
    return [{"role": m["role"], "content": redact(m["content"], rules)} for m in messages]
