"""KV cells of earlier prompts that no slot holds any more, kept in RAM under a byte budget.

When the engine gives a slot to a new prompt, the cells the slot held (an earlier prompt and
its answer) would be lost; they are stored here first, and a later prompt that starts the same
way (the same question again, a question about the same note) loads them instead of
evaluating those tokens again. Least recently used entries go first when the budget is full.
Each entry belongs to the client whose prompt it holds: another client is offered only the
part it may see (see `best`). Only the inference thread uses it; `stats` may be read from
anywhere.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

from edgeagent.decoder import common_prefix, starts_with

Key = tuple[int, ...]


class PromptCache:
    MIN_TOKENS = 16  # shorter runs of cells are cheaper to evaluate than to keep

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: collections.OrderedDict[Key, bytes] = collections.OrderedDict()
        self._owners: dict[Key, str] = {}
        self._bytes = 0
        self.hits = 0
        self.stored = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._items),
            "mb": round(self._bytes / 1e6, 1),
            "hits": self.hits,
            "stored": self.stored,
            "evicted": self.evicted,
        }

    def best(self, tokens: list[int], owner: str, public: int) -> tuple[int, Optional[Key]]:
        """The entry sharing the longest start with `tokens`, and how many tokens it shares:
        at most `public` of another owner's entry (the part every prompt starts with)."""
        found, key = 0, None
        for item in self._items:
            n = common_prefix(item, tokens)
            if self._owners.get(item) != owner:
                n = min(n, public)
            if n > found:
                found, key = n, item
        return found, key

    def get(self, key: Key) -> bytes:
        return self._items[key]

    def hit(self, key: Key) -> None:
        """The entry was used: count it and keep it longest (if it is still here)."""
        if key in self._items:
            self._items.move_to_end(key)
        self.hits += 1

    def drop(self, key: Key) -> None:
        state = self._items.pop(key, None)
        self._owners.pop(key, None)
        if state is not None:
            self._bytes -= len(state)

    def covers(self, tokens: list[int], owner: str) -> bool:
        """Some entry of `owner` holds these tokens' cells (or more that start with them)."""
        return any(
            starts_with(item, tokens) and self._owners.get(item) == owner for item in self._items
        )

    def wants(self, tokens: list[int], owner: str) -> bool:
        return (
            bool(self.budget) and len(tokens) >= self.MIN_TOKENS and not self.covers(tokens, owner)
        )

    def put(self, tokens: list[int], state: bytes, owner: str) -> None:
        """Keep these cells; the owner's entries they extend are dropped, the oldest go over
        budget."""
        if not self.budget or len(state) > self.budget:
            return
        key = tuple(tokens)
        for item in [k for k in self._items if starts_with(key, k)]:
            if self._owners.get(item) == owner:
                self.drop(item)
        if key in self._items:  # the same tokens, another owner's: the newest owner keeps them
            self.drop(key)
        self._items[key] = state
        self._owners[key] = owner
        self._bytes += len(state)
        self.stored += 1
        while self._bytes > self.budget:
            old_key, old = self._items.popitem(last=False)
            self._owners.pop(old_key, None)
            self._bytes -= len(old)
            self.evicted += 1
