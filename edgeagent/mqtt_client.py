"""paho client set-up shared by the MQTT front end, the cloud link and the cloud worker."""

from __future__ import annotations

import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import TlsConfig


def read_secret(path: str, credential: str) -> Optional[str]:
    """A secret from `path`, else from systemd's credentials directory, else None."""
    if not path and os.environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(os.environ["CREDENTIALS_DIRECTORY"]) / credential
        path = str(candidate) if candidate.is_file() else ""
    if not path:
        return None
    return Path(path).read_text().rstrip("\r\n")


def connect_failure() -> tuple[int, str]:
    """(log level, reason) of the failed connection attempt paho is handling, for its
    `on_connect_fail` callback (paho calls that inside its `except OSError`, which this reads).
    A TLS failure (an untrusted or wrong certificate) is an error: retrying will not fix it."""
    exc = sys.exc_info()[1]
    if exc is None:
        return logging.WARNING, "unknown error"
    level = logging.ERROR if isinstance(exc, ssl.SSLError) else logging.WARNING
    return level, str(exc) or type(exc).__name__


def new_client(
    client_id: str,
    *,
    v5: bool = True,
    manual_ack: bool = False,
    username: str = "",
    password: Optional[str] = None,
    tls: Optional[TlsConfig] = None,
    reconnect: tuple[int, int] = (1, 30),
    logger: Optional[logging.Logger] = None,
) -> mqtt.Client:
    """A client for a persistent session (clean_start=false on v5, clean_session=false on 3.1.1)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else False,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    if logger is not None and logger.isEnabledFor(logging.DEBUG):
        client.enable_logger(logger)  # paho is chatty about every reconnect attempt
    client.reconnect_delay_set(*reconnect)
    client.max_queued_messages_set(100_000)
    if username:
        client.username_pw_set(username, password)
    if tls is not None and tls.enabled:
        client.tls_set(
            ca_certs=tls.ca_file or None,
            certfile=tls.cert_file or None,
            keyfile=tls.key_file or None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int = 0) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


def publish_properties(
    correlation: Optional[bytes] = None, response_topic: Optional[str] = None
) -> Optional[Properties]:
    if correlation is None and response_topic is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if correlation is not None:
        props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props
