"""Every MQTT topic edgeagent uses, built in one place (see docs/mqtt.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Topics:
    prefix: str
    node_id: str
    shared_group: str = ""
    named_topics: tuple[str, ...] = ()  # [mqtt.schemas] and [mqtt.kb] keys: "ask/alarm", ...

    @property
    def ask(self) -> str:
        """Requests for this node."""
        return f"{self.prefix}/{self.node_id}/ask"

    @property
    def shared_ask(self) -> str:
        """Requests for any node of the group (published to `<prefix>/ask`)."""
        return f"$share/{self.shared_group}/{self.prefix}/ask" if self.shared_group else ""

    @property
    def group_ask(self) -> str:
        """Where a client publishes to reach any node of a shared group."""
        return f"{self.prefix}/ask"

    @property
    def ask_deep(self) -> str:
        """Requests for this node that go to the cloud model (the topic-level escalation rule)."""
        return f"{self.prefix}/{self.node_id}/ask/deep"

    def node_topic(self, suffix: str) -> str:
        """`<prefix>/<node_id>/<suffix>`: where `[mqtt.schemas]` or `[mqtt.kb]` key `suffix`
        takes requests."""
        return f"{self.prefix}/{self.node_id}/{suffix}"

    def default_reply(self, suffix: str) -> str:
        """Where a request on named topic `ask/<name>` that names no reply topic is answered:
        `<prefix>/<node_id>/answer/<name>` (a PLC gateway publishing plain text over v3.1.1
        has no Response Topic to give)."""
        return self.node_topic("answer/" + suffix.removeprefix("ask/"))

    @property
    def status(self) -> str:
        """Retained availability: online with details, or offline (also the Last Will)."""
        return f"{self.prefix}/{self.node_id}/status"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/{self.node_id}/metrics"

    def subscriptions(self, deep: bool = False) -> list[str]:
        fixed = (self.ask, self.shared_ask, self.ask_deep if deep else "")
        return [t for t in fixed if t] + [self.node_topic(s) for s in self.named_topics]


@dataclass(frozen=True)
class CloudTopics:
    """Topics on the cloud broker, shared by edge daemons and cloud workers."""

    prefix: str

    @property
    def ask(self) -> str:
        """Escalations from every edge node."""
        return f"{self.prefix}/ask"

    def shared_ask(self, group: str) -> str:
        """What workers subscribe to: each escalation goes to one worker of the group."""
        return f"$share/{group}/{self.prefix}/ask"

    def reply(self, node_id: str) -> str:
        """Where a node's escalations are answered (MQTT v5 Response Topic)."""
        return f"{self.prefix}/reply/{node_id}"

    def worker_status(self, worker_id: str) -> str:
        """Retained: online with details, or offline (also the worker's Last Will)."""
        return f"{self.prefix}/worker/{worker_id}/status"

    @property
    def worker_statuses(self) -> str:
        return f"{self.prefix}/worker/+/status"


MAX_TOPIC_BYTES = 65535  # MQTT's own limit on a topic name
# What a reply topic may not hold besides wildcards: the C0 controls (NUL included), DEL, the C1
# controls and the 66 noncharacters. MQTT forbids NUL and says SHOULD NOT for the rest; mosquitto
# refuses every one of them (mosquitto_validate_utf8) by disconnecting the client that publishes
# there, and paho sends that publish again after each reconnect, so one hostile reply topic would
# keep the link down. Refusing what the strictest broker refuses keeps any broker's link up.
_NONCHARACTERS = "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(17))
_FORBIDDEN = re.compile(rf"[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef{_NONCHARACTERS}+#]")


def reply_topic_problem(topic: object, max_bytes: int = MAX_TOPIC_BYTES) -> Optional[str]:
    """Why `topic` may not be published to, or None when it may: a non-empty str of valid
    UTF-8 within `max_bytes`, not under `$` (the broker's own topics), no wildcard, no control
    character or noncharacter. The reason never quotes the topic, so it is safe to log and to
    send back whatever the client wrote."""
    if not isinstance(topic, str):
        return f"is not a string but {type(topic).__name__}"
    if len(topic) > max_bytes:  # a character is at least one byte: too long without encoding
        return f"is longer than {max_bytes} bytes"
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size == 0:
        return "is empty"
    if size > max_bytes:
        return f"is longer than {max_bytes} bytes"
    if topic.startswith("$"):
        return "starts with `$` (topics the broker keeps for itself)"
    found = _FORBIDDEN.search(topic)
    if found is None:
        return None
    if found.group() in "+#":
        return "holds a wildcard (`+` or `#`)"
    return f"holds U+{ord(found.group()):04X} (a control character or noncharacter)"
