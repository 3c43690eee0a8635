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
    def ask_deep(self) -> str:
        """Requests for this node that go to the cloud model (the topic-level escalation rule)."""
        return f"{self.prefix}/{self.node_id}/ask/deep"

    @property
    def status(self) -> str:
        """Retained availability: online with details, or offline (also the Last Will)."""
        return f"{self.prefix}/{self.node_id}/status"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/{self.node_id}/metrics"

    def subscriptions(self, deep: bool = False) -> list[str]:
        return [t for t in (self.ask, self.shared_ask, self.ask_deep if deep else "") if t]


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


def valid_reply_topic(topic: object) -> bool:
    """A topic a reply may be published to: non-empty, no wildcards, within MQTT's limit."""
    return (
        isinstance(topic, str)
        and 0 < len(topic.encode()) <= 65535
        and "+" not in topic
        and "#" not in topic
        and "\0" not in topic
    )
