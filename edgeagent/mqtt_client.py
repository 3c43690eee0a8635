"""paho client set-up shared by the MQTT front end, the cloud link and the cloud worker."""

from __future__ import annotations

import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import paho.mqtt.properties
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import TlsConfig, read_secret_file


def _read_utf(buffer: bytes, maxlen: int) -> tuple[str, int]:
    """An MQTT v5 UTF-8 string property, as paho 2.2's `readUTF` reads it less one check.

    paho takes U+FEFF in a received Response Topic (or any string property) for a malformed
    packet and drops the connection; the broker then delivers the same message again after the
    reconnect, for ever, so one client could take the link down. MQTT 5.0 allows U+FEFF
    ([MQTT-1.5.4-3] says only that it must not be stripped) and mosquitto passes it on; what
    the reply topic may hold is edgeagent's own check (topics.reply_topic_problem).
    """
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = int.from_bytes(bytes(buffer[:2]), "big")
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    text = bytes(buffer[2 : 2 + length]).decode("utf-8")  # strict: no encoded surrogates
    if "\0" in text:
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    return text, length + 2


paho.mqtt.properties.readUTF = _read_utf


class SecretError(Exception):
    """A secret file that cannot be used. The message is `key: path: reason`; put the
    config file's name in front for a `file: key: reason` line."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"{key}: {path}: {reason}")
        self.key, self.path, self.reason = key, path, reason


def read_secret(path: str, credential: str, key: str = "") -> Optional[str]:
    """A secret from `path`, else from systemd's credentials directory, else None.

    Raises SecretError naming `key` (the config key that names the file; default the
    credential) when the file cannot be read: a start must end in one problem line and exit
    2, not a traceback and a restart loop. A credential that was not passed in is None.
    """
    named = bool(path)
    if not named:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None
        path = str(Path(directory) / credential)
    try:
        return read_secret_file(path)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not named:
            return None
        raise SecretError(key or credential, path, exc.strerror or str(exc)) from None


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


def connect_properties(
    session_expiry_s: int, receive_maximum: int = 0, max_packet_size: int = 0
) -> Properties:
    """MQTT v5 CONNECT properties; `max_packet_size` (0: none) is the largest packet the broker
    may send us: it drops larger messages for us instead of delivering them."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    if max_packet_size:
        props.MaximumPacketSize = max_packet_size
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
