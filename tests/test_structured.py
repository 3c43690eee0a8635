"""Structured answers with the real model: `format` and `grammar` on the socket and over HTTP,
and the decoder's grammar-first draw itself. (Escalation with a schema, and MQTT's schema
topics, are in test_escalation.py; the 50 factory prompts in test_structured_prompts.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openai
import pytest

from edgeagent.decoder import BatchDecoder
from tests.conftest import Conn, Daemon, connect

ALARM = {
    "type": "object",
    "properties": {
        "alarm": {"type": "string"},
        "severity": {"enum": ["low", "medium", "high"]},
        "checks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["alarm", "severity", "checks"],
}
NOTE = (
    "Filler 3 shows alarm F17: low air pressure at the capper. Give the alarm, its severity "
    "and the checks to make."
)


@pytest.fixture(scope="module")
def grammars(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon that takes raw GBNF (`[engine] allow_grammar`, off by default)."""
    return daemon_factory(engine_extra="allow_grammar = true")


@pytest.fixture
def gconn(grammars: Daemon) -> Iterator[Conn]:
    with connect(grammars.socket_path) as c:
        yield c


def ask(conn: Conn, rid: str, **fields: Any) -> dict[str, Any]:
    conn.send({"id": rid, "prompt": NOTE, "max_tokens": 96, **fields})
    return conn.until_final(rid)[-1]


def test_a_schema_gives_a_parsed_value_that_fits_it(conn: Conn) -> None:
    done = ask(conn, "s1", format=ALARM)
    assert done["event"] == "done", done
    value = done["json"]
    assert set(value) == {"alarm", "severity", "checks"}
    assert value["severity"] in ("low", "medium", "high")
    assert isinstance(value["checks"], list) and all(isinstance(c, str) for c in value["checks"])


def test_json_gives_an_object(conn: Conn) -> None:
    done = ask(
        conn,
        "j1",
        format="json",
        max_tokens=200,
        prompt="Alarm F17 on filler 3: give its code and severity as JSON, nothing else.",
    )
    assert done["event"] == "done", repr(done.get("text"))
    assert isinstance(done["json"], dict)


def test_a_grammar_holds_the_answer_to_its_language(gconn: Conn, conn: Conn) -> None:
    refused = ask(conn, "g0", grammar='root ::= "yes" | "no"')
    assert refused["code"] == "bad_request" and "allow_grammar" in refused["message"], refused
    done = ask(gconn, "g1", grammar='root ::= "yes" | "no"', prompt="Is 3 larger than 2?")
    assert done["event"] == "done", done
    assert done["text"] in ("yes", "no") and "json" not in done


def test_an_answer_cut_inside_its_structure_is_incomplete(conn: Conn) -> None:
    final = ask(conn, "i1", format=ALARM, max_tokens=5)
    assert final["event"] == "error" and final["code"] == "incomplete", final
    assert final["text"].startswith("{")


def test_a_grammar_cut_by_max_tokens_is_incomplete_unless_it_could_end_there(gconn: Conn) -> None:
    """A raw grammar's answer has no JSON to parse: whether it may end where max_tokens cut
    it is asked of the grammar itself."""
    long = 'root ::= "check the air supply, then the regulator, then the capper valve"'
    cut = ask(gconn, "gi1", grammar=long, max_tokens=3)
    assert cut["event"] == "error" and cut["code"] == "incomplete", cut
    assert cut["text"] and "check the air supply".startswith(cut["text"]), cut
    whole = ask(gconn, "gi2", grammar='root ::= "yes" | "no"', max_tokens=1,
                prompt="Is 3 larger than 2?")  # fmt: skip
    assert whole["event"] == "done" and whole["text"] in ("yes", "no"), whole
    stopped = ask(gconn, "gi3", grammar=long, stop=["regulator"], max_tokens=40)
    assert stopped["code"] == "incomplete", stopped


def test_bad_schemas_and_grammars_are_bad_requests(gconn: Conn) -> None:
    conn = gconn
    for rid, fields in [
        ("b1", {"format": "yaml"}),
        ("b2", {"format": {"type": "string", "pattern": "abc"}}),
        ("b3", {"grammar": 'x ::= "a"'}),
        ("b4", {"grammar": 'root ::= ( "a"'}),  # llama.cpp's parser refuses it
        ("b5", {"format": "json", "grammar": 'root ::= "a"'}),
        ("b6", {"format": {"type": "object", "required": "alarm"}}),  # not a JSON Schema
    ]:
        final = ask(conn, rid, **fields)
        assert final["event"] == "error" and final["code"] == "bad_request", (rid, final)


def test_a_value_outside_what_the_grammar_could_hold_is_invalid(conn: Conn) -> None:
    """`minimum` is beyond what the schema's grammar holds the decoding to; the value is
    checked against the whole schema before `done`."""
    schema = {"type": "object", "properties": {"bar": {"type": "integer", "minimum": 1000}},
              "required": ["bar"]}  # fmt: skip
    final = ask(conn, "v1", format=schema, prompt="Line pressure now: 6 bar. Give it as JSON.")
    if final["event"] == "done":
        assert final["json"]["bar"] >= 1000, final
    else:
        assert final["code"] == "invalid" and "bar" in final["message"], final


def test_openai_response_format_over_http(daemon: Daemon) -> None:
    sdk = openai.OpenAI(base_url=f"{daemon.http_url}/v1", api_key="none", max_retries=0)
    messages: Any = [{"role": "user", "content": NOTE}]
    answer = sdk.chat.completions.create(
        model="m", messages=messages, max_tokens=96,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "alarm", "schema": ALARM, "strict": True}},
    )  # fmt: skip
    value = json.loads(answer.choices[0].message.content or "")
    assert set(value) == {"alarm", "severity", "checks"}
    with pytest.raises(openai.UnprocessableEntityError) as cut:
        sdk.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                    response_format={"type": "json_object"})  # fmt: skip
    assert cut.value.code == "incomplete"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model="m", messages=messages, max_tokens=4, response_format={"type": "yaml"}
        )  # type: ignore[arg-type]
    assert bad.value.param == "response_format"


def test_constrained_and_free_answers_are_the_same_alone_and_batched(grammars: Daemon) -> None:
    """Greedy answers do not depend on what shares the step, grammars or not."""
    daemon = grammars
    asks = [
        {"format": ALARM, "prompt": NOTE},
        {"prompt": "Name two causes of low air pressure at a capper."},
        {"format": "json", "prompt": "Alarm F21 on labeller 2: give its code and severity."},
        {"grammar": 'root ::= "yes" | "no"', "prompt": "Is a capper part of a filling line?"},
    ]

    def request(i: int, fields: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"b{i}", "max_tokens": 48, **fields}

    alone = []
    for i, fields in enumerate(asks):
        with connect(daemon.socket_path) as c:
            c.send(request(i, fields))
            alone.append(c.until_final(f"b{i}")[-1])
    conns = [connect(daemon.socket_path) for _ in asks]
    try:
        for i, (c, fields) in enumerate(zip(conns, asks)):
            c.send(request(i, fields))
        batched = [c.until_final(f"b{i}")[-1] for i, c in enumerate(conns)]
    finally:
        for c in conns:
            c.close()
    assert max(f["timings"]["peak_batch"] for f in batched if f["event"] == "done") > 1
    for one, many in zip(alone, batched):
        assert (one["event"], one.get("text")) == (many["event"], many.get("text"))


def test_a_grammar_that_allows_nothing_fails_its_request_only(gconn: Conn) -> None:
    """No token starts with NUL and the grammar cannot end yet: that request ends with an
    error, and the inference thread goes on with the next one."""
    conn = gconn
    final = ask(conn, "n1", grammar="root ::= [\\x00]", max_tokens=4)
    assert final["event"] == "error", final
    after = ask(conn, "n2", max_tokens=4)
    assert after["event"] == "done", after


def test_an_incomplete_answer_is_not_kept_in_the_session(conn: Conn) -> None:
    cut = ask(conn, "c1", format=ALARM, max_tokens=5, session="line-3")
    assert cut["code"] == "incomplete", cut
    conn.send({"id": "c2", "prompt": "What did you answer before?", "session": "line-3",
               "max_tokens": 4})  # fmt: skip
    follow = conn.until_final("c2")[-1]
    assert follow["usage"]["prompt_tokens"] < cut["usage"]["prompt_tokens"] + 20, follow


@pytest.fixture(scope="module")
def decoder(model_file: Path) -> Iterator[BatchDecoder]:
    dec = BatchDecoder(model_file, n_ctx=256, n_slots=1, n_batch=64, n_threads=2)
    yield dec
    dec.close()


def test_a_grammar_never_takes_a_control_token(decoder: BatchDecoder) -> None:
    """llama.cpp's grammar reads a control token by its special text, so a JSON string takes
    <|fim_prefix|> while the answer's text gets none of it. Made the model's first choice
    inside a string, it is passed over for the best token the grammar allows."""
    dec, slot = decoder, decoder.slots[0]
    prompt = "<|im_start|>user\nName a valve.<|im_end|>\n<|im_start|>assistant\n"
    dec.clear(slot)
    dec.set_sampler(slot, 0.0, grammar='root ::= "\\"" [a-z <|>_]{1,40} "\\""')
    dec.reuse(slot, dec.tokenize(prompt, special=True))
    for _ in dec.steps([], [(slot, len(slot.pending), True)]):
        pass
    opening = dec.sample(slot)
    assert dec.piece(opening).startswith(b'"')
    closed = len(dec.piece(opening)) > 1 and dec.piece(opening).endswith(b'"')
    assert dec.grammar_complete(slot) is closed
    for _ in dec.steps([(slot, opening)], []):
        pass
    control = sorted(dec.control_tokens())
    assert control and not any(dec.is_eog(t) for t in control)
    logits = np.ctypeslib.as_array(
        dec._lib.llama_get_logits_ith(dec.ctx, slot.logits_at), shape=(dec.n_vocab,)
    )
    logits[control[0]] = logits.max() + 100.0  # the chain's own draw is now a control token
    token = dec.sample(slot)
    assert token not in control and dec.piece(token), (token, dec.piece(token, special=True))
    assert dec.grammar_stats["resampled"] >= 1
