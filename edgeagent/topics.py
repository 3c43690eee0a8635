"""Every MQTT topic edgeagent uses, built in one place (see docs/mqtt.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    node_id: str
    shared_group: str = ""

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
    def status(self) -> str:
        """Retained availability: online with details, or offline (also the Last Will)."""
        return f"{self.prefix}/{self.node_id}/status"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/{self.node_id}/metrics"

    def subscriptions(self) -> list[str]:
        return [t for t in (self.ask, self.shared_ask) if t]


def valid_reply_topic(topic: object) -> bool:
    """A topic a reply may be published to: non-empty, no wildcards, within MQTT's limit."""
    return (
        isinstance(topic, str)
        and 0 < len(topic.encode()) <= 65535
        and "+" not in topic
        and "#" not in topic
        and "\0" not in topic
    )
