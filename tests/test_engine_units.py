"""Pure helpers of the engine: stop-string matching, session history trimming, the prompt
cache and the system-prompt snapshots' keys."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edgeagent.decoder import common_prefix, starts_with
from edgeagent.job import StopMatcher
from edgeagent.kvreuse import PrefixStore
from edgeagent.promptcache import PromptCache
from edgeagent.sessions import PRIVATE, SessionStore, drop_oldest_turn, plain, shareable


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, str, bool]:
    m = StopMatcher(stops)
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
    conv = store.get("u1", "a")
    for i in range(4):
        store.commit(conv, [{"role": "user", "content": f"u{i}"},
                                 {"role": "assistant", "content": f"a{i}"}])  # fmt: skip
    assert [m["content"] for m in conv.messages] == ["u2", "a2", "u3", "a3"]
    store.store_kv(conv, [1, 2], b"x" * 60)
    other = store.get("u1", "b")
    store.store_kv(other, [3], b"y" * 60)  # over budget: the older state goes
    assert conv.kv_state is None and other.kv_state is not None
    store.get("u1", "c")  # third session: the least recently used one is dropped
    assert len(store) == 2
    assert store.get("u1", "a").messages == []


def test_sessions_belong_to_their_client() -> None:
    store = SessionStore(max_sessions=8, max_turns=8, idle_s=3600, kv_budget=100)
    mine = store.get("uid:1000", "shift")
    store.commit(mine, [{"role": "user", "content": "badge KX9"}])
    store.store_kv(mine, [5, 6, 7], b"k")
    theirs = store.get("uid:1001", "shift")  # the same name: a new, empty conversation
    assert theirs is not mine and theirs.messages == []
    assert store.covers([5, 6], "uid:1000") and not store.covers([5, 6], "uid:1001")
    assert not store.drop("uid:1001", "nope")
    assert store.drop("uid:1001", "shift")  # its own
    assert store.get("uid:1000", "shift").messages == [{"role": "user", "content": "badge KX9"}]


def test_private_turns_never_leave_with_the_history() -> None:
    history = [
        {"role": "user", "content": "badge KX9", PRIVATE: "1"},
        {"role": "assistant", "content": "noted KX9", PRIVATE: "1"},
        {"role": "user", "content": "line speed?"},
        {"role": "assistant", "content": "120/min"},
    ]
    assert shareable(history) == history[2:]
    assert all(set(m) == {"role", "content"} for m in plain(history))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0


def test_starts_with() -> None:
    assert starts_with((1, 2, 3), [1, 2]) and starts_with([1, 2], [1, 2])
    assert not starts_with([1, 2], [1, 2, 3]) and not starts_with([1, 3, 3], [1, 2])


def test_prompt_cache_keeps_the_longest_runs_under_its_budget() -> None:
    cache = PromptCache(budget=3000)
    stem = list(range(20))
    cache.put(stem, b"a" * 1000, "me")
    cache.put([*stem, 100, 101], b"b" * 1000, "me")  # extends the first: it replaces it
    assert len(cache) == 1 and cache.stats()["stored"] == 2
    # already held, not stored again
    assert cache.covers(stem, "me") and not cache.wants(stem, "me")
    cache.put([*range(50, 70)], b"c" * 1000, "me")
    cache.put([*range(80, 100)], b"d" * 1000, "me")
    shared, key = cache.best([*stem, 100, 7], "me", 0)
    assert shared == 21 and key is not None
    cache.hit(key)  # now the most recently used: the next insert evicts another entry
    cache.put([*range(200, 220)], b"e" * 1000, "me")
    assert cache.stats()["evicted"] == 1 and cache.stats()["hits"] == 1
    assert cache.best([*stem, 100], "me", 0)[0] == 21
    assert cache.best([*range(50, 70)], "me", 0)[0] == 0  # the least recently used one went
    assert len(cache) == 3
    cache.drop(key)
    assert cache.best([*stem, 100], "me", 0)[0] == 0
    assert not PromptCache(budget=0).wants(stem, "me")
    assert not cache.wants(list(range(5)), "me")  # too short to be worth keeping


def test_another_clients_cells_serve_only_the_public_start() -> None:
    cache = PromptCache(budget=10_000)
    secret = [*range(30), 900, 901, 902]  # a template start of 30 tokens, then a question
    cache.put(secret, b"s" * 100, "uid:1000")
    assert cache.best([*range(30), 900, 901, 5], "uid:1001", 30)[0] == 30
    assert cache.best([*range(30), 900, 901, 5], "uid:1000", 30)[0] == 32
    # Another client's entry is neither taken as covering its prompt nor replaced by it.
    assert cache.wants(secret, "uid:1001")
    cache.put(secret[:-1], b"t" * 100, "uid:1001")
    assert len(cache) == 2


def test_prefix_snapshots_made_with_flash_attention_are_kept_apart(tmp_path: Path) -> None:
    """Flash attention lays the V cells out differently; llama.cpp refuses such a state in a
    context without it, so a snapshot is only read back by a daemon with the same setting."""
    tokens = list(range(40))
    plain = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    plain.add(tokens, b"state")
    plain.flush()
    fa = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4, flash_attn=True)
    assert fa.key(tokens) != plain.key(tokens)
    assert fa.get(tokens) is None
    # Even under the other's file name, the header tells them apart.
    (tmp_path / f"{plain.key(tokens)}.kv").rename(tmp_path / f"{fa.key(tokens)}.kv")
    assert fa.get(tokens) is None
    again = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    again.add(tokens, b"state")
    again.flush()
    found = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4).get(tokens)
    assert found is not None and found.origin == "disk" and found.state == b"state"


def test_prefix_snapshots_computed_by_other_kernels_are_not_read_back(tmp_path: Path) -> None:
    """Cells read back must be the ones computing the prompt again would give: a snapshot
    made before prompt rows went to the tiled matmul (no tag) is left alone."""
    tokens = list(range(40))
    old = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    old.add(tokens, b"state")
    old.flush()
    now = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4, kernels="roles8")
    assert now.get(tokens) is None
    (tmp_path / f"{old.key(tokens)}.kv").rename(tmp_path / f"{now.key(tokens)}.kv")
    assert now.get(tokens) is None  # the header tells them apart too
    now.add(tokens, b"state")
    now.flush()
    found = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4, kernels="roles8").get(tokens)
    assert found is not None and found.state == b"state"


def test_a_prefix_snapshot_is_loaded_only_when_its_mac_checks_out(tmp_path: Path) -> None:
    """llama.cpp loads a snapshot's bytes as they are: a file changed by anyone but the daemon
    (or damaged) is never handed to it, and the key and files are the daemon user's only."""
    tokens = list(range(40))
    store = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    store.add(tokens, b"state-bytes")
    store.flush()
    path = tmp_path / f"{store.key(tokens)}.kv"
    assert path.stat().st_mode & 0o077 == 0
    assert (tmp_path / PrefixStore.KEY_FILE).stat().st_mode & 0o077 == 0
    assert PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4).get(tokens) is not None
    header, state = path.read_bytes().split(b"\n", 1)
    path.write_bytes(header + b"\n" + state.replace(b"state", b"STATE"))  # same length
    tampered = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    assert tampered.get(tokens) is None and tampered.rejected == 1
    # A header rewritten to match, without the key, does not pass either.
    path.write_bytes(header.replace(b'"mac": "', b'"mac": "0') + b"\n" + state)
    assert PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4).get(tokens) is None


def test_a_clients_own_system_prompt_snapshot_is_its_own(tmp_path: Path) -> None:
    tokens = list(range(40))
    store = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    store.add(tokens, b"mine", owner="uid:1000")
    store.flush()
    assert store.get(tokens, "uid:1001") is None and store.get(tokens) is None
    fresh = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    assert fresh.get(tokens, "uid:1001") is None
    found = fresh.get(tokens, "uid:1000")
    assert found is not None and found.state == b"mine" and found.origin == "disk"


def test_one_client_cannot_push_out_the_others_sessions() -> None:
    store = SessionStore(max_sessions=8, max_turns=8, idle_s=3600, kv_budget=100, per_client=3)
    store.get("uid:1000", "kept")
    for i in range(20):  # a client naming ever new sessions
        store.get("uid:1001", f"s{i}")
    assert len(store) == 4  # the first client's one, and the last 3 of the other's
    assert store.drop("uid:1000", "kept")
    assert not store.drop("uid:1001", "s16") and store.drop("uid:1001", "s19")


def test_a_key_file_of_the_wrong_size_is_no_key(tmp_path: Path) -> None:
    (tmp_path / PrefixStore.KEY_FILE).write_bytes(b"")  # a crash right after creating it
    store = PrefixStore(tmp_path, "sha", 1024, 1 << 20, 4)
    store.add(list(range(40)), b"state")
    store.flush()
    assert not list(tmp_path.glob("*.kv"))  # nothing written under an empty key
    assert store.get(list(range(40))) is not None  # RAM still serves it
