"""Which prompt tokens are the model's own words, with the default model's real chat template
and vocabulary (no weights): those are read the way they were decoded (edgeagent.decoder), so
a conversation read again gives the cells its decoding gave."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgeagent.decoder import Feed, Slot, pack, tokens_inside
from edgeagent.engine import answer_spans


@pytest.fixture(scope="module")
def vocab(model_file: Path) -> Iterator[tuple[Any, Any]]:
    llm = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    template = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()]).decode(),
        bos_token="",
    )
    yield llm, template
    llm.close()


def marks(vocab: tuple[Any, Any], messages: list[dict[str, str]]) -> tuple[list[int], list[bytes],
                                                                          list[bool]]:  # fmt: skip
    """The prompt's tokens, their pieces, and which are marked as the model's words."""
    llm, template = vocab
    text = template(messages=messages).prompt
    spans = answer_spans(messages, text, lambda m: template(messages=m).prompt)
    assert spans is not None
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    pieces = []
    for t in tokens:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, t, buf, 64, 0, True)
        pieces.append(buf.raw[:n])
    return tokens, pieces, tokens_inside(pieces, len(text.encode()), spans)


def words(vocab: tuple[Any, Any], messages: list[dict[str, str]]) -> list[str]:
    """The texts of the tokens marked as the model's words, in order."""
    _tokens, pieces, marked = marks(vocab, messages)
    return [p.decode(errors="replace") for p, m in zip(pieces, marked) if m]


def test_an_answer_is_marked_and_the_same_words_in_a_question_are_not(
    vocab: tuple[Any, Any],
) -> None:
    messages = [
        {"role": "user", "content": "Answer:\nyes or no? Reply with the word yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Why yes?"},
    ]
    assert words(vocab, messages) == ["\n", "yes"]  # the token it answered after, and its answer


def test_every_answer_of_a_conversation_is_marked_whole(vocab: tuple[Any, Any]) -> None:
    messages = [
        {"role": "system", "content": "You help on line 4."},
        {"role": "user", "content": "Torque for M8?"},
        {"role": "assistant", "content": "25 Nm for M8 screws, über 8.8 grade."},
        {"role": "user", "content": "And M10?"},
        {"role": "assistant", "content": "About 49 Nm."},
        {"role": "user", "content": "Thanks"},
    ]
    assert "".join(words(vocab, messages)) == (
        "\n25 Nm for M8 screws, über 8.8 grade.\nAbout 49 Nm."
    )


def test_the_token_marked_before_an_answer_is_the_last_token_of_the_prompt_that_asked(
    vocab: tuple[Any, Any],
) -> None:
    """The engine reads a prompt's last token with the model's words; in the next turn's
    prompt the same token, before the answer, must be marked the same way."""
    llm, template = vocab
    asked = [{"role": "user", "content": "Torque for M8?"}]
    text = template(messages=asked).prompt  # ends with the assistant's opening
    first = llm.tokenize(text.encode(), add_bos=False, special=True)
    then = [*asked, {"role": "assistant", "content": "25 Nm."}, {"role": "user", "content": "M10?"}]
    tokens, _pieces, marked = marks(vocab, then)
    assert tokens[: len(first)] == first
    assert marked[len(first) - 1] and not any(marked[: len(first) - 1])


def test_no_answers_no_marks_and_a_template_that_changes_them_gives_none() -> None:
    plain = [{"role": "user", "content": "hi"}]
    assert answer_spans(plain, "hi", lambda m: "hi") == []
    said = [*plain, {"role": "assistant", "content": " padded "}]
    strip = lambda m: "".join(x["content"].strip() for x in m)  # noqa: E731
    assert answer_spans(said, strip(said), strip) is None


def test_tokens_inside_skips_a_bos_and_refuses_pieces_that_do_not_spell_the_text() -> None:
    pieces = [b"<s>", b"ab", b"cd", b"ef"]
    assert tokens_inside(pieces, 6, [(2, 4)]) == [False, True, True, False]
    assert tokens_inside(pieces[1:], 6, [(2, 6)]) == [True, True, True]
    assert tokens_inside(pieces[1:], 6, [(4, 4)]) == [False, True, False]  # an empty answer
    assert tokens_inside(pieces[1:], 7, [(2, 6)]) == [False, False, False]


def test_rows_for_the_row_by_row_kernel_are_packed_evenly_under_the_limit() -> None:
    """decoder.pack: 8 decoding streams in calls of at most 7 rows go 4 and 4; a prompt's
    last tokens join them without splitting a sequence's rows."""
    slots = [Slot(seq=i) for i in range(10)]
    streams: list[Feed] = [(s, [1], True) for s in slots[:8]]
    assert [len(c) for c in pack(streams, 7)] == [4, 4]
    tail: Feed = (slots[8], [5, 6, 7], True)
    calls = pack([*streams[:5], tail], 7)
    assert [[len(f[1]) for f in c] for c in calls] == [[1, 1, 1, 1], [1, 3]]
    assert pack([], 7) == []
