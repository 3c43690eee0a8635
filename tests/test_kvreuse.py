"""KvReuse's rules without a model: which slot a prompt takes, and where the start of its
cells comes from (its slot, a session, another slot, the RAM prompt cache, a system-prompt
snapshot), with a stand-in decoder whose "cells" are the tokens they hold."""

from __future__ import annotations

import json
from typing import Optional

from edgeagent.decoder import Slot
from edgeagent.kvreuse import COPY_MIN_TOKENS, KvReuse, PrefixStore
from edgeagent.promptcache import PromptCache
from edgeagent.sessions import Conversation, SessionStore

SYSTEM = list(range(1000, 1020))  # a system prompt's 20 tokens (PrefixStore.MIN_TOKENS is 16)


class Cells:
    """A decoder that keeps, for each slot, only the tokens its cells hold. Saved cells are
    those tokens as JSON, so a load puts back exactly what was saved; `refuse` makes every
    load of a state with that many tokens fail, as llama.cpp may."""

    def __init__(self, n: int) -> None:
        self.slots = [Slot(seq=i) for i in range(n)]
        self.refuse: set[int] = set()
        self.loads: list[tuple[int, int]] = []  # (slot, tokens loaded)

    def save(self, slot: Slot) -> bytes:
        return json.dumps(slot.cached).encode()

    def load(self, slot: Slot, tokens: list[int], state: bytes) -> bool:
        assert json.loads(state) == tokens, "a state loaded with tokens it does not hold"
        self.loads.append((slot.seq, len(tokens)))
        if len(tokens) in self.refuse:
            slot.cached = []
            return False
        slot.cached = list(tokens)
        return True

    def truncate(self, slot: Slot, keep: int) -> None:
        slot.cached = slot.cached[:keep]


def reuse() -> KvReuse:
    prefixes = PrefixStore(None, "sha", 2048, budget=1 << 20, max_files=8)
    sessions = SessionStore(max_sessions=8, max_turns=8, idle_s=600, kv_budget=1 << 20)
    return KvReuse(prefixes, PromptCache(1 << 20), sessions)


def prompt(*tail: int) -> list[int]:
    return [*SYSTEM, *tail]


def hold(cells: Cells, seq: int, tokens: list[int], owner: str = "a") -> Slot:
    slot = cells.slots[seq]
    slot.cached, slot.owner = list(tokens), owner
    return slot


def fill(kv: KvReuse, cells: Cells, tokens: list[int], owner: str = "a", *,
         busy: tuple[int, ...] = (), conv: Optional[Conversation] = None, prefix_end: int = 0,
         public: Optional[int] = None) -> tuple[Slot, str]:  # fmt: skip
    public = len(SYSTEM) if public is None else public
    return kv.fill(cells, set(busy), tokens, conv, prefix_end, owner, public, "")


def test_a_prompt_that_continues_a_free_slot_takes_it_as_it_is() -> None:
    kv, cells = reuse(), Cells(3)
    hold(cells, 1, prompt(*range(30)))
    slot, source = fill(kv, cells, prompt(*range(30), 7, 8))
    assert (slot.seq, source) == (1, "slot")
    assert cells.loads == []


def test_the_last_prompt_token_is_always_evaluated() -> None:
    """A slot holding all of the prompt but its last token is as good as any source: that
    token is read again for its logits, so a session holding the whole prompt adds nothing."""
    kv, cells = reuse(), Cells(2)
    tokens = prompt(*range(30))
    hold(cells, 0, tokens[:-1])
    conv = Conversation(kv_tokens=tokens, kv_state=json.dumps(tokens).encode())
    slot, source = fill(kv, cells, tokens, conv=conv)
    assert (slot.seq, source) == (0, "slot")
    assert cells.loads == []


def test_one_token_more_from_a_session_is_worth_loading() -> None:
    kv, cells = reuse(), Cells(2)
    tokens = prompt(*range(30))
    hold(cells, 0, tokens[:-2])
    conv = Conversation(kv_tokens=tokens, kv_state=json.dumps(tokens).encode())
    slot, source = fill(kv, cells, tokens, conv=conv)
    assert (slot.seq, source) == (0, "session")
    assert slot.cached == tokens[:-1]  # what was loaded beyond the prompt's reach is cut


def test_a_new_prompt_takes_an_empty_slot_before_one_holding_cells() -> None:
    kv, cells = reuse(), Cells(3)
    hold(cells, 0, [5] * 40)
    hold(cells, 2, [6] * 40)
    slot, source = fill(kv, cells, [7] * 40)
    assert (slot.seq, source) == (1, "slot")
    assert cells.slots[0].cached == [5] * 40 and cells.slots[2].cached == [6] * 40


def test_without_an_empty_slot_the_least_recently_used_one_is_replaced() -> None:
    kv, cells = reuse(), Cells(2)
    hold(cells, 0, [5] * 40)
    hold(cells, 1, [6] * 40)
    kv.slot_used.update({0: 2.0, 1: 1.0})  # slot 1 was used longer ago
    slot, _ = fill(kv, cells, [7] * 40)
    assert slot.seq == 1
    # Its cells went to the prompt cache, from which the same prompt comes back.
    slot.cached, slot.owner = [7] * 40, "a"
    slot, source = fill(kv, cells, [6] * 40 + [9])
    assert source == "ram"
    assert slot.cached == [6] * 40


def test_a_running_slots_cells_are_copied_when_they_hold_enough_more() -> None:
    kv, cells = reuse(), Cells(3)
    long = prompt(*range(40))
    hold(cells, 0, long)  # running
    slot, source = fill(kv, cells, [*long, 1, 2], busy=(0,))
    assert source == "copied" and slot.seq != 0
    assert slot.cached == long


def test_fewer_than_the_copy_margin_more_are_evaluated_instead() -> None:
    kv, cells = reuse(), Cells(3)
    tokens = prompt(*range(40))
    hold(cells, 0, tokens, owner="a")  # running, holds everything
    # Free, and COPY_MIN_TOKENS - 1 short of what the running slot offers (which stops one
    # short of the prompt: its last token is always read).
    hold(cells, 1, tokens[: len(tokens) - COPY_MIN_TOKENS])
    slot, source = fill(kv, cells, tokens, busy=(0,))
    assert (slot.seq, source) == (1, "slot")  # 3 more would not pay for a copy
    assert cells.loads == []
    hold(cells, 1, tokens[: len(tokens) - COPY_MIN_TOKENS - 1])
    slot, source = fill(kv, cells, tokens, busy=(0,))
    assert (slot.seq, source) == (1, "copied")  # 4 more do


def test_another_clients_cells_serve_only_the_public_start() -> None:
    kv, cells = reuse(), Cells(2)
    theirs = prompt(*range(40))
    hold(cells, 0, theirs, owner="b")  # running
    slot, source = fill(kv, cells, [*theirs, 1], owner="a", busy=(0,))
    assert source == "copied"
    assert slot.cached == SYSTEM  # what every prompt starts with, nothing of b's question
    assert slot.owner == "a"


def test_a_sessions_saved_cells_are_used_over_a_shorter_slot() -> None:
    kv, cells = reuse(), Cells(2)
    history = prompt(*range(60))
    conv = Conversation(kv_tokens=history, kv_state=json.dumps(history).encode())
    hold(cells, 0, prompt(*range(10)))
    slot, source = fill(kv, cells, [*history, 5, 6], conv=conv)
    assert source == "session"
    assert slot.cached == history


def test_on_a_tie_the_smallest_state_is_loaded() -> None:
    """A system-prompt snapshot and a long conversation in another slot both hold the
    prompt's first 20 tokens: the snapshot (20 tokens) is loaded, not the 60-token copy."""
    kv, cells = reuse(), Cells(3)
    hold(cells, 0, prompt(*range(40)), owner="b")  # running, someone else's
    kv.prefixes.add(SYSTEM, json.dumps(SYSTEM).encode())
    slot, source = fill(kv, cells, prompt(99, 98, 97), busy=(0,), prefix_end=len(SYSTEM))
    assert source == "prefix-computed"
    assert cells.loads == [(slot.seq, len(SYSTEM))]
    assert kv.prefixes.stats()["prefix_hits"] == {"computed": 1}


def test_a_refused_load_falls_back_to_the_next_source_and_leaves_the_cache() -> None:
    kv, cells = reuse(), Cells(2)
    cached = prompt(*range(40))
    kv.prompt_cache.put(cached, json.dumps(cached).encode(), "a")
    kv.prefixes.add(SYSTEM, json.dumps(SYSTEM).encode())
    cells.refuse.add(len(cached))
    slot, source = fill(kv, cells, [*cached, 1], prefix_end=len(SYSTEM))
    assert source == "prefix-computed"
    assert slot.cached == SYSTEM
    assert len(kv.prompt_cache) == 0  # the entry llama.cpp refused is gone


def test_when_nothing_loads_the_slot_starts_empty() -> None:
    kv, cells = reuse(), Cells(2)
    cached = prompt(*range(40))
    kv.prompt_cache.put(cached, json.dumps(cached).encode(), "a")
    cells.refuse.add(len(cached))
    slot, source = fill(kv, cells, [*cached, 1])
    assert source == "none" and slot.cached == []


def test_a_replaced_slot_is_not_stashed_twice_for_the_same_client() -> None:
    """Cells that another slot of the same client already holds are not stored again."""
    kv, cells = reuse(), Cells(3)
    tokens = prompt(*range(40))
    hold(cells, 0, tokens)
    hold(cells, 1, tokens)
    hold(cells, 2, [3] * 40)
    kv.slot_used.update({0: 2.0, 1: 1.0, 2: 3.0})  # slot 1 is the least recently used
    slot, _ = fill(kv, cells, [8] * 40)
    assert slot.seq == 1
    assert len(kv.prompt_cache) == 0


def test_cells_a_session_of_the_same_client_holds_are_not_stashed() -> None:
    kv, cells = reuse(), Cells(1)
    tokens = prompt(*range(40))
    hold(cells, 0, tokens)
    conv = kv.sessions.get("a", "line-3")
    kv.sessions.store_kv(conv, [*tokens, 1, 2], b"cells")
    fill(kv, cells, [8] * 40)
    assert len(kv.prompt_cache) == 0
    hold(cells, 0, tokens, owner="b")  # another client's: its cells are kept
    fill(kv, cells, [8] * 40)
    assert len(kv.prompt_cache) == 1
