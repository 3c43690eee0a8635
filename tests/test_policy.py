"""The escalation rules (pure functions) and the config that feeds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent import config, policy
from edgeagent.config import EscalationConfig
from edgeagent.protocol import ProtocolError, Request, parse
from edgeagent.structured import Constraint


def req(text: str = "What is OEE?", **kw: object) -> Request:
    return Request(id="r", messages=({"role": "user", "content": text},), **kw)  # type: ignore[arg-type]


RULES = policy.Rules.from_config(
    EscalationConfig(
        keywords=("Torque Spec",),
        patterns=(r"\bE\d{3}\b",),
        min_prompt_tokens=50,
        deep_topic=True,
        low_confidence=True,
        min_mean_logprob=-1.0,
        redact=((r"SN-\d{6}", "[serial]"), (r"\b\d{1,3}(\.\d{1,3}){3}\b", "[ip]")),
    )
)


def decide(r: Request, deep: bool = False, tokens: int = 10) -> object:
    return policy.before_answer(r, RULES, via_deep_topic=deep, count_tokens=lambda _t: tokens)


def test_plain_question_stays_local() -> None:
    assert decide(req()) is None


def test_each_rule_fires_with_its_reason() -> None:
    assert decide(req(escalate=True)) == policy.Reason("flag")
    assert decide(req(), deep=True) == policy.Reason("topic")
    assert decide(req("what is the torque spec of M8?")) == policy.Reason("keyword", "torque spec")
    assert decide(req("alarm E042 on press 3")) == policy.Reason("pattern", r"\bE\d{3}\b")
    long_text = "word " * 60
    assert decide(req(long_text), tokens=60) == policy.Reason("prompt_tokens", ">= 50")
    assert decide(req(long_text), tokens=49) is None


def test_short_texts_never_reach_the_tokenizer() -> None:
    def boom(_t: str) -> int:
        raise AssertionError("tokenizer called for a text shorter than the limit in bytes")

    assert policy.before_answer(req("hi"), RULES, via_deep_topic=False, count_tokens=boom) is None


def test_private_and_escalate_false_forbid_every_rule() -> None:
    for r in (req("torque spec E042", private=True, escalate=True),
              req("torque spec E042", escalate=False)):  # fmt: skip
        assert decide(r, deep=True, tokens=10_000) is None
        assert policy.after_answer(r, RULES, -50.0) is None


def test_a_raw_grammar_stays_on_the_box_and_a_format_may_leave() -> None:
    """Model servers take JSON Schemas (response_format), not GBNF: a `grammar` keeps its
    request local (`escalate: true` beside it is a bad_request); a `format` goes along."""
    r = req("torque spec E042", constraint=Constraint("grammar", 'root ::= "a"'))
    assert decide(r, deep=True, tokens=10_000) is None
    assert policy.after_answer(r, RULES, -50.0) is None
    with pytest.raises(ProtocolError, match="`escalate` cannot go with `grammar`"):
        parse({"id": "s", "prompt": "hi", "grammar": 'root ::= "a"', "escalate": True},
              max_tokens_limit=64)  # fmt: skip
    for kind in ("json", "schema"):
        r = req("torque spec E042", constraint=Constraint(kind, 'root ::= "a"', {}))
        assert decide(r, deep=True, tokens=10_000) == policy.Reason("topic")
        assert policy.after_answer(r, RULES, -50.0) is not None
    flagged = parse({"id": "s", "prompt": "hi", "format": "json", "escalate": True},
                    max_tokens_limit=64)  # fmt: skip
    assert isinstance(flagged, Request) and flagged.escalate
    assert decide(flagged, deep=False, tokens=1) == policy.Reason("flag")


def test_low_confidence_is_a_second_opinion_rule() -> None:
    assert policy.after_answer(req(), RULES, -2.5) == policy.Reason(
        "low_confidence", "mean logprob -2.50 < -1.0"
    )
    assert policy.after_answer(req(), RULES, -0.2) is None
    assert policy.after_answer(req(), RULES, None) is None
    off = policy.Rules.from_config(EscalationConfig(low_confidence=False))
    assert policy.after_answer(req(), off, -50.0) is None


def test_redaction_applies_to_every_message() -> None:
    messages = [
        {"role": "system", "content": "Box at 10.1.2.3"},
        {"role": "user", "content": "Unit SN-123456 and SN-654321 fail"},
    ]
    out = policy.redact_messages(messages, RULES)
    assert out == [
        {"role": "system", "content": "Box at [ip]"},
        {"role": "user", "content": "Unit [serial] and [serial] fail"},
    ]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_config_reads_lists_and_redactions(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            '[cloud]\nenabled = true\n[escalation]\nenabled = true\nkeywords = ["a", "b"]\n'
            "patterns = ['x\\d+']\nredact = [['SN-\\d+', '[serial]']]\n",
        )
    )
    assert cfg.escalation.keywords == ("a", "b")
    assert cfg.escalation.patterns == (r"x\d+",)
    assert cfg.escalation.redact == ((r"SN-\d+", "[serial]"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[escalation]\nenabled = true\n", "escalation.enabled: needs the cloud broker"),
        ("[escalation]\npatterns = ['(unclosed']\n", "escalation.patterns: '(unclosed' is not a"),
        ("[escalation]\nkeywords = 'scrap'\n", "escalation.keywords: expected a list"),
        ("[escalation]\nredact = [['a']]\n", "escalation.redact: expected a list of [regex,"),
        ("[escalation]\noffline = 'later'\n", "escalation.offline: 'later' is not one of"),
        ("[worker]\nbase_url = 'ftp://x'\n", "worker.base_url: expected an http"),
        ("[cloud]\ntopic_prefix = 'a/#'\n", "cloud.topic_prefix:"),
    ],
)
def test_bad_escalation_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.load(write(tmp_path, text))
    assert any(expected in p for p in exc.value.problems), exc.value.problems


def test_a_schema_going_to_the_cloud_is_redacted_like_the_messages() -> None:
    schema = {
        "type": "object",
        "description": "faults of unit SN-123456",
        "properties": {"unit": {"enum": ["SN-123456", "SN-654321"]}, "n": {"type": "integer"}},
    }
    out = policy.redact_value(schema, RULES)
    assert "123456" not in json.dumps(out) and "654321" not in json.dumps(out)
    assert out["properties"]["n"] == {"type": "integer"} and set(out["properties"]) == {"unit", "n"}
