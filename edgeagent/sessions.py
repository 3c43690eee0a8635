"""Conversations kept for follow-ups (`session` in a request), each its own client's."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from edgeagent.decoder import starts_with

# Marks a session message that came from (or answered) a private request: it is part of the
# conversation on the box and never part of what is sent to the cloud.
PRIVATE = "private"


def plain(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the chat template takes them (role and content only)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def shareable(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages that may leave the box: every one not marked private."""
    return plain([m for m in messages if PRIVATE not in m])


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    kv_tokens: list[int] = field(default_factory=list)
    kv_state: Optional[bytes] = None


SessionKey = tuple[str, str]  # (owner, session name): one client's names are its own


class SessionStore:
    """Conversations kept for follow-ups: bounded in count, age, turns and saved-KV bytes.

    A conversation belongs to the client that started it: another client naming the same
    session gets a new one of its own, and cannot tell that the name is taken.
    """

    def __init__(self, max_sessions: int, max_turns: int, idle_s: float, kv_budget: int,
                 per_client: int = 1 << 30) -> None:  # fmt: skip
        self.max_sessions, self.max_turns, self.idle_s = max_sessions, max_turns, idle_s
        self.kv_budget, self.per_client = kv_budget, per_client
        self._items: collections.OrderedDict[SessionKey, Conversation] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, owner: str, name: str) -> Conversation:
        with self._lock:
            self._expire()
            conv = self._items.pop((owner, name), None) or Conversation()
            conv.last_used = time.monotonic()
            self._items[owner, name] = conv
            mine = [key for key in self._items if key[0] == owner]
            for key in mine[: max(0, len(mine) - self.per_client)]:  # its own oldest first
                del self._items[key]
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
            return conv

    def messages(self, conv: Conversation) -> list[dict[str, str]]:
        """A copy of a conversation's messages (the other thread may be adding a turn)."""
        with self._lock:
            return list(conv.messages)

    def drop(self, owner: str, name: str) -> bool:
        with self._lock:
            return self._items.pop((owner, name), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(len(c.kv_state or b"") for c in self._items.values())

    def covers(self, tokens: Sequence[int], owner: str) -> bool:
        """One of `owner`'s conversations has saved cells that hold these tokens (or more
        that start with them)."""
        with self._lock:
            self._expire()
            return any(
                starts_with(c.kv_tokens, tokens)
                for (who, _name), c in self._items.items()
                if who == owner
            )

    def commit(self, conv: Conversation, new: list[dict[str, str]]) -> None:
        """Add a finished turn. A conversation reset meanwhile stays forgotten."""
        with self._lock:
            conv.messages.extend(new)
            turns = sum(1 for m in conv.messages if m["role"] == "user")
            while turns > self.max_turns and drop_oldest_turn(conv.messages):
                turns -= 1

    def store_kv(self, conv: Conversation, tokens: list[int], state: bytes) -> None:
        with self._lock:
            if len(state) > self.kv_budget:
                return
            conv.kv_tokens, conv.kv_state = tokens, state
            total = sum(len(c.kv_state or b"") for c in self._items.values())
            for other in self._items.values():  # least recently used first
                if total <= self.kv_budget:
                    break
                if other is not conv and other.kv_state is not None:
                    total -= len(other.kv_state)
                    other.kv_state, other.kv_tokens = None, []

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, conv = next(iter(self._items.items()))
            if now - conv.last_used < self.idle_s:
                break
            del self._items[key]


def drop_oldest_turn(messages: list[dict[str, str]]) -> bool:
    """Remove the oldest user turn and the replies to it; system messages stay."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if start is None:
        return False
    end = start + 1
    while end < len(messages) and messages[end]["role"] != "user":
        end += 1
    del messages[start:end]
    return True
