"""Pure helpers of the engine: stop-string matching and session history trimming."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeagent.engine import SessionStore, _StopMatcher, common_prefix, drop_oldest_turn


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, str, bool]:
    m = _StopMatcher(stops)
    sent, hit = "", False
    for p in pieces:
        out, hit = m.feed(p)
        sent += out
        if hit:
            break
    if not hit:
        sent += m.flush()
    return sent, m.text, hit


def test_stop_string_split_across_pieces_is_never_sent() -> None:
    sent, text, hit = feed_all(("STOP",), ["abc S", "TO", "P def"])
    assert (sent, text, hit) == ("abc ", "abc ", True)


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    sent, text, hit = feed_all(("STOP",), ["abc ST", "ART"])
    assert (sent, text, hit) == ("abc START", "abc START", False)


@given(
    text=st.text(alphabet="abS TOP", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_sent_text_is_always_the_final_text(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    sent, final, hit = feed_all(("STOP", "bb"), pieces)
    assert sent == final
    assert "STOP" not in final and "bb" not in final
    if not hit:
        assert final == text


def test_drop_oldest_turn_keeps_system_messages() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert drop_oldest_turn(msgs)
    assert [m["content"] for m in msgs] == ["s", "u2", "a2"]
    assert drop_oldest_turn(msgs)
    assert not drop_oldest_turn(msgs)
    assert [m["content"] for m in msgs] == ["s"]


def test_session_store_bounds_turns_sessions_and_kv_bytes() -> None:
    store = SessionStore(max_sessions=2, max_turns=2, idle_s=3600, kv_budget=100)
    conv = store.get("a")
    for i in range(4):
        store.commit(conv, [{"role": "user", "content": f"u{i}"},
                                 {"role": "assistant", "content": f"a{i}"}])  # fmt: skip
    assert [m["content"] for m in conv.messages] == ["u2", "a2", "u3", "a3"]
    store.store_kv(conv, [1, 2], b"x" * 60)
    other = store.get("b")
    store.store_kv(other, [3], b"y" * 60)  # over budget: the older state goes
    assert conv.kv_state is None and other.kv_state is not None
    store.get("c")  # third session: the least recently used one is dropped
    assert len(store) == 2
    assert store.get("a").messages == []


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
