"""TOML configuration: parsed into frozen dataclasses, every problem reported at once.

Each section is a dataclass whose fields carry their bounds in `metadata`; one generic
validator walks them, so a new key is one line here and is checked, documented and
rejected-when-unknown in the same way as every other.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import stat
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from edgeagent._toml import tomllib
from edgeagent.protocol import MAX_KB_COLLECTIONS
from edgeagent.structured import Limits, constraint_of

DEFAULT_CONFIG_RESOURCE = "default.toml"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CORE_LIMIT = 4096  # core numbers in [cpu] go from 0 to CORE_LIMIT - 1
# C0, DEL and C1: MQTT forbids U+0000 in topics and client ids and advises against the others
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SECRET_MAX_BYTES = 64 << 10  # MQTT caps a password at 65535 bytes; an API key is far shorter


def state_dir() -> Path:
    """Where edgeagent keeps its files (the escalation spool, the knowledge base): systemd's
    $STATE_DIRECTORY (StateDirectory=), else $XDG_STATE_HOME or ~/.local/state, /edgeagent."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgeagent"


def _f(default: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
       choices: Optional[tuple[str, ...]] = None, doc: str = "") -> Any:  # fmt: skip
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("", doc="model name from edgeagent/models.toml (default: the manifest's)")
    path: str = _f("", doc="explicit GGUF file; overrides name")
    sha256: str = _f("", doc="expected sha256 of `path` (64 hex digits); empty: not checked")
    n_ctx: int = _f(4096, lo=256, hi=131072)
    max_tokens: int = _f(512, lo=1, hi=131072)
    n_batch: int = _f(512, lo=8, hi=8192)
    temperature: float = _f(0.2, lo=0.0, hi=2.0)
    system_prompt: str = _f("", doc="system message for requests that bring none")


@dataclass(frozen=True)
class EngineConfig:
    queue_size: int = _f(16, lo=1, hi=10000, doc="waiting requests; more get `busy`")
    request_timeout_s: float = _f(120.0, lo=0.1, hi=86400.0)
    max_sessions: int = _f(64, lo=0, hi=100000)
    max_sessions_per_client: int = _f(
        16, lo=1, hi=100000, doc="conversations one client keeps; its oldest goes first"
    )
    session_max_turns: int = _f(32, lo=1, hi=10000)
    session_idle_s: float = _f(3600.0, lo=1.0, hi=30 * 86400.0)
    session_cache_mb: int = _f(256, lo=0, hi=65536, doc="RAM for saved session KV states")
    stall_timeout_s: float = _f(
        60.0, lo=0.05, hi=3600.0,
        doc="a request making no progress this long counts as a hang: the watchdog stops",
    )  # fmt: skip
    drain_timeout_s: float = _f(10.0, lo=0.0, hi=3600.0, doc="on SIGTERM, time to finish")
    parallel: int = _f(
        0, lo=0, hi=64,
        doc="requests decoded together, each with model.n_ctx cells; 0: from threads and n_ctx",
    )  # fmt: skip
    max_slots_per_client: int = _f(
        0, lo=0, hi=64, doc="slots one connection or MQTT reply topic may hold; 0: all but one"
    )
    prefill_chunk: int = _f(
        128, lo=1, hi=8192,
        doc="prompt tokens read per step while others stream (their longest stall)",
    )  # fmt: skip
    batch_invariant: bool = _f(
        True,
        doc="same greedy output alone or batched, cached or not (off: llama.cpp's own kernel "
        "choice, flash attention and repacked weights)",
    )
    prefix_cache_dir: str = _f(
        "", doc='system-prompt snapshots; "" = $CACHE_DIRECTORY/prefix or ~/.cache, "off" = none'
    )
    prefix_cache_mb: int = _f(64, lo=0, hi=65536, doc="RAM for system-prompt snapshots")
    prefix_cache_files: int = _f(16, lo=1, hi=10000, doc="snapshots kept on disk (newest)")
    prompt_cache_mb: int = _f(
        32, lo=0, hi=65536, doc="RAM for earlier prompts' cells no slot holds any more; 0: off"
    )
    allow_grammar: bool = _f(
        False,
        doc="take requests' raw GBNF `grammar` (an ambiguous grammar can hold the inference "
        "thread for long; `format` schemas are always taken)",
    )
    format_max_bytes: int = _f(
        16_384, lo=64, hi=65_536, doc="largest JSON Schema a request's `format` may be"
    )
    format_max_depth: int = _f(16, lo=2, hi=64, doc="... and how deep it may nest")
    format_max_repeat: int = _f(
        256, lo=1, hi=1024,
        doc="... its largest minItems, maxItems, minLength, maxLength (each one grammar rules)",
    )  # fmt: skip
    grammar_max_bytes: int = _f(
        16_384, lo=64, hi=1 << 20, doc="longest GBNF `grammar` taken (with allow_grammar)"
    )
    share_prompt_cache: bool = _f(
        False,
        doc="reuse one client's prompt cells for another beyond the system prompt (faster, but "
        "usage.cached_tokens then tells a client what others asked recently)",
    )


Cores = Union[str, tuple[int, ...]]


@dataclass(frozen=True)
class CpuConfig:
    cores: Cores = field(
        default="auto",
        metadata={"kind": "cores", "doc": '"auto", a list like [2, 3] or a cpulist like "2-3"'},
    )
    io_cores: Cores = field(
        default="auto", metadata={"kind": "cores", "doc": "cores for socket and MQTT threads"}
    )
    threads: int = _f(0, lo=0, hi=256, doc="inference threads; 0: one per inference core")
    sysfs_root: str = _f("/sys", doc="where to read CPU frequencies (tests point it elsewhere)")


@dataclass(frozen=True)
class SocketConfig:
    path: str = _f("/run/edgeagent/edgeagent.sock")
    mode: int = _f(0o660, lo=0, hi=0o777)
    max_line_bytes: int = _f(1 << 20, lo=1024, hi=64 << 20)
    max_inflight_per_conn: int = _f(32, lo=1, hi=10000)
    priority: int = _f(1, lo=-100, hi=100, doc="for requests that set none; higher goes first")
    group: str = _f(
        "", doc="group given the socket file (when not socket-activated); empty: the daemon's"
    )
    max_connections: int = _f(
        64, lo=1, hi=100000, doc="terminals connected at once; more are refused with busy"
    )
    idle_timeout_s: float = _f(
        900.0, lo=0.0, hi=30 * 86400.0,
        doc="close a connection with nothing in flight that sent nothing this long; 0: never",
    )  # fmt: skip
    max_unsent_bytes: int = _f(
        1 << 20, lo=64 << 10, hi=1 << 30,
        doc="replies a terminal has not read yet; past this it is cut off",
    )  # fmt: skip


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _f(True)
    listen: tuple[str, ...] = field(
        default=("127.0.0.1:8080",),
        metadata={
            "kind": "listen",
            "doc": 'HOST:PORT ("[::1]:8080" for IPv6) or an absolute Unix socket path, or a list',
        },
    )
    api_keys_file: str = _f(
        "", doc="client keys, a `name: key` per line (default: $CREDENTIALS_DIRECTORY/"
        "http-api-keys); required for an address that is not loopback",
    )  # fmt: skip
    tls_cert_file: str = _f("", doc="serve HTTPS with this certificate chain (PEM)")
    tls_key_file: str = _f("", doc="and this private key (PEM, without a pass phrase)")
    max_body_bytes: int = _f(1 << 20, lo=1024, hi=64 << 20, doc="largest request body")
    max_connections: int = _f(
        128, lo=1, hi=100000, doc="connections open at once; more get a 503 and are closed"
    )
    max_inflight_per_key: int = _f(
        16, lo=1, hi=10000, doc="requests one key (or all keyless loopback clients) runs at once"
    )
    priority: int = _f(1, lo=-100, hi=100, doc="for requests that set none; higher goes first")


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = _f(False)
    ca_file: str = _f("", doc="CA bundle to verify the broker (empty: the system's)")
    cert_file: str = _f("", doc="client certificate, for brokers that require one")
    key_file: str = _f("", doc="client private key")


@dataclass(frozen=True)
class TopicSchema:
    """`[mqtt.schemas]`: requests on `<prefix>/<node_id>/<topic>` get `schema` as their
    default `format` (read from `path` at start)."""

    topic: str  # "ask/alarm"
    path: str
    schema: Any = None  # the file's JSON Schema, once read


@dataclass(frozen=True)
class TopicKb:
    """`[mqtt.kb]`: requests on `<prefix>/<node_id>/<topic>` that do not say `kb` use the
    manuals per `kb` (True: every collection; names: those; False: none)."""

    topic: str  # "ask" or "ask/manuals"
    kb: Union[bool, tuple[str, ...]]


SCHEMA_TOPIC_RE = re.compile(r"ask(/[A-Za-z0-9_.-]{1,64}){1,4}")
MAX_SCHEMA_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = _f(False)
    host: str = _f("localhost")
    port: int = _f(1883, lo=1, hi=65535)
    protocol: str = _f("5", choices=("5", "3.1.1"), doc="MQTT version to speak")
    client_id: str = _f(
        "", doc="stable id for the persistent session (default edgeagent-<node_id>)"
    )
    keepalive: int = _f(30, lo=1, hi=65535, doc="seconds; the Last Will fires after 1.5x this")
    qos: int = _f(1, lo=0, hi=1, doc="QoS of subscriptions and token events (finals are QoS 1)")
    topic_prefix: str = _f("edgeagent")
    shared_group: str = _f("", doc="also take requests from $share/<group>/<prefix>/ask")
    username: str = _f("")
    password_file: str = _f(
        "", doc="file holding the password (default: $CREDENTIALS_DIRECTORY/mqtt-password)"
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    session_expiry_s: int = _f(
        86400,
        lo=0,
        hi=4294967295,
        doc="how long the broker keeps requests for us while we are away",
    )
    token_interval_ms: int = _f(50, lo=0, hi=10000, doc="coalesce token events for this long")
    token_batch: int = _f(16, lo=1, hi=10000, doc="... or until this many tokens are pending")
    metrics_interval_s: float = _f(30.0, lo=1.0, hi=86400.0)
    max_payload_bytes: int = _f(
        1 << 20, lo=1024, hi=256 << 20,
        doc="largest request; v5: the Maximum Packet Size asked of the broker follows from it",
    )  # fmt: skip
    max_reply_topic_bytes: int = _f(
        512, lo=16, hi=65535, doc="longest reply topic (Response Topic or reply_to) accepted"
    )
    redelivery_mb: int = _f(
        8, lo=1, hi=4096, doc="RAM for remembering requests, to answer a redelivered one once"
    )
    max_inflight_per_client: int = _f(32, lo=1, hi=10000, doc="per reply topic")
    priority: int = _f(0, lo=-100, hi=100, doc="for requests that set none; higher goes first")
    reconnect_min_s: int = _f(1, lo=1, hi=3600)
    reconnect_max_s: int = _f(30, lo=1, hi=3600)
    schemas: tuple[TopicSchema, ...] = field(
        default=(),
        metadata={
            "kind": "schemas",
            "doc": '{"ask/alarm" = "alarm.json", ...}: a default JSON Schema per request topic',
        },
    )
    kb: tuple[TopicKb, ...] = field(
        default=(),
        metadata={
            "kind": "topic_kb",
            "doc": '{"ask" = true, "ask/manuals" = ["line-4"], ...}: whether a topic\'s '
            "requests use the manuals when they do not say `kb`",
        },
    )


@dataclass(frozen=True)
class EscalationConfig:
    enabled: bool = _f(False, doc="escalate flagged requests to the cloud model ([cloud])")
    offline: str = _f(
        "local+queue", choices=("local", "queue", "local+queue"),
        doc="cloud unreachable: answer locally, spool for the cloud, or both",
    )  # fmt: skip
    timeout_s: float = _f(
        30.0, lo=0.1, hi=3600.0, doc="wait this long for a cloud answer, then answer locally"
    )
    keywords: tuple[str, ...] = field(
        default=(), metadata={"kind": "strings", "doc": "escalate prompts containing one of these"}
    )
    patterns: tuple[str, ...] = field(
        default=(), metadata={"kind": "regexes", "doc": "escalate prompts matching a regex"}
    )
    min_prompt_tokens: int = _f(0, lo=0, hi=1 << 20, doc="escalate prompts this long; 0: off")
    deep_topic: bool = _f(True, doc="escalate requests published on <prefix>/<node_id>/ask/deep")
    low_confidence: bool = _f(False, doc="second opinion when the local answer is unsure")
    min_mean_logprob: float = _f(
        -1.0, lo=-100.0, hi=0.0, doc="... unsure: mean token log-probability below this"
    )
    redact: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={"kind": "redactions", "doc": "[[regex, placeholder], ...] applied to cloud text"},
    )
    max_tokens: int = _f(1024, lo=1, hi=131072, doc="answer length asked of the cloud model")
    spool_path: str = _f(
        "", doc="escalation spool (sqlite); default $STATE_DIRECTORY or ~/.local/state/edgeagent"
    )
    spool_max: int = _f(10000, lo=1, hi=10_000_000, doc="escalations waiting; oldest dropped")
    spool_mb: int = _f(256, lo=1, hi=1 << 20, doc="bytes of waiting escalations; oldest dropped")
    client_spool_max: int = _f(
        1000, lo=1, hi=10_000_000, doc="escalations one client may have waiting; more: refused"
    )
    client_spool_mb: int = _f(16, lo=1, hi=1 << 20, doc="... and their bytes")
    max_answer_bytes: int = _f(
        256 << 10, lo=1024, hi=64 << 20, doc="longest cloud answer taken; a longer one is an error"
    )
    spool_max_age_s: float = _f(7 * 86400.0, lo=1.0, hi=365 * 86400.0)
    result_ttl_s: float = _f(7 * 86400.0, lo=1.0, hi=365 * 86400.0, doc="answers kept for `result`")
    max_inflight: int = _f(4, lo=1, hi=1000, doc="spooled escalations sent to the cloud at once")
    resend_s: float = _f(
        300.0, lo=1.0, hi=86400.0, doc="ask again when a sent escalation is silent this long"
    )


@dataclass(frozen=True)
class CloudConfig:
    enabled: bool = _f(False, doc="connect to the cloud broker (escalation and the worker)")
    host: str = _f("localhost")
    port: int = _f(1883, lo=1, hi=65535)
    client_id: str = _f("", doc="default edgeagent-<node_id>-cloud (worker: -worker-<id>)")
    keepalive: int = _f(30, lo=1, hi=65535)
    topic_prefix: str = _f("edgeagent-cloud")
    username: str = _f("")
    password_file: str = _f(
        "", doc="file holding the password (default: $CREDENTIALS_DIRECTORY/cloud-password)"
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    session_expiry_s: int = _f(7 * 86400, lo=0, hi=4294967295)
    reconnect_min_s: int = _f(1, lo=1, hi=3600)
    reconnect_max_s: int = _f(30, lo=1, hi=3600)


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str = _f("", doc="default: the host name")
    shared_group: str = _f("edgeagent-workers", doc="workers in one group share <cloud>/ask")
    base_url: str = _f("http://127.0.0.1:8000/v1", doc="OpenAI-compatible API (vLLM, TGI)")
    model: str = _f("meta-llama/Meta-Llama-3-8B-Instruct")
    api_key_file: str = _f(
        "",
        doc="empty: $CREDENTIALS_DIRECTORY/cloud-api-key; $EDGEAGENT_CLOUD_API_KEY overrides both",
    )
    concurrency: int = _f(4, lo=1, hi=1024, doc="completions running at once")
    request_timeout_s: float = _f(120.0, lo=1.0, hi=3600.0)
    max_tokens: int = _f(1024, lo=1, hi=131072)
    temperature: float = _f(0.2, lo=0.0, hi=2.0)
    token_interval_ms: int = _f(50, lo=0, hi=10000, doc="coalesce streamed tokens this long")
    max_answer_bytes: int = _f(
        256 << 10, lo=1024, hi=64 << 20, doc="longest answer streamed back; the rest is cut"
    )
    response_format: str = _f(
        "openai", choices=("openai", "tgi", "llama-cpp", "off"),
        doc="how an escalation's JSON Schema is passed on: OpenAI's json_schema (vLLM, "
        "llama-server), TGI's json_object+value, llama-cpp-python's json_object+schema, or not",
    )  # fmt: skip


@dataclass(frozen=True)
class KbConfig:
    path: str = _f(
        "", doc="the knowledge base (sqlite); default $STATE_DIRECTORY or ~/.local/state/edgeagent"
    )
    top_k: int = _f(4, lo=1, hi=20, doc="passages given to the model with a grounded question")
    passage_tokens: int = _f(
        240, lo=32, hi=2048, doc="a passage's size when a document is added (estimated tokens)"
    )
    min_match: float = _f(
        0.34, lo=0.0, hi=1.0,
        doc="share of the question's keywords one of the passages must hold, else not covered",
    )  # fmt: skip
    not_covered: str = _f(
        "The manuals on this station do not cover this question.",
        doc="the answer when no passage is close enough (no guess from the model)",
    )
    private: tuple[str, ...] = field(
        default=(),
        metadata={"kind": "strings", "doc": "collections whose passages never leave the box"},
    )
    front_ends: tuple[str, ...] = field(
        default=(),
        metadata={
            "kind": "strings",
            "doc": 'front ends whose requests use the manuals unless they say "kb": false '
            '("socket", "mqtt", "http")',
        },
    )
    embedding_model: str = _f(
        "", doc="an embedding GGUF: passages get vectors, searched beside the words (optional)"
    )
    embedding_threads: int = _f(1, lo=1, hi=64, doc="threads that embed a question")


@dataclass(frozen=True)
class LogConfig:
    level: str = _f("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    node_id: str = _f("")
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    kb: KbConfig = field(default_factory=KbConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})


class ConfigError(Exception):
    """Raised with every problem found; `problems` holds one `file: key: reason` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _check_cores(value: Any) -> tuple[Any, Optional[str]]:
    expected = 'expected "auto", a list of core numbers or a cpulist like "0-3,6"'
    if value == "auto":
        return value, None
    if isinstance(value, str):
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value):
            return value, f"{expected}, got {value!r}"
        cores, problem = _expand_cpulist(value)
        if problem:
            return value, problem
        value = cores
    if not isinstance(value, list) or not value:
        return value, f"{expected}, got {value!r}"
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        return value, f"{expected}, got {value!r}"
    if not all(0 <= c < CORE_LIMIT for c in value):
        return value, f"core numbers go from 0 to {CORE_LIMIT - 1}, got {value!r}"
    return tuple(sorted(set(value))), None


def _expand_cpulist(text: str) -> tuple[list[int], Optional[str]]:
    """The cores of a well-formed cpulist like "0-3,6", or why they are out of range.

    Each piece is range-checked before it is expanded: a typo like "0-20000000" must be a
    problem line, not a list of twenty million (nor a 5,000-digit number for int()).
    """
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        first, last = (n.lstrip("0") or "0" for n in (first, last or first))
        # Lengths first: int() is only given numbers of a few digits.
        if len(last) > len(str(CORE_LIMIT)) or int(last) >= CORE_LIMIT:
            return [], f"core numbers go from 0 to {CORE_LIMIT - 1}, got {part!r}"
        if len(first) > len(last) or int(first) > int(last):
            return [], f"a range goes from the lower core to the higher, got {part!r}"
        out.extend(range(int(first), int(last) + 1))
    return out, None


def _check_strings(value: Any, kind: str) -> tuple[Any, Optional[str]]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return value, f"expected a list of non-empty strings, got {value!r}"
    if kind == "regexes":
        for v in value:
            try:
                re.compile(v)
            except re.error as exc:
                return value, f"{v!r} is not a valid regular expression: {exc}"
    return tuple(value), None


def _check_schemas(value: Any) -> tuple[Any, Optional[str]]:
    """`[mqtt.schemas]`: topic suffixes under `ask/` mapped to schema files (read later)."""
    if not isinstance(value, dict):
        return value, 'expected a table like {"ask/alarm" = "/etc/edgeagent/alarm.json"}'
    out = []
    for topic, path in value.items():
        if not SCHEMA_TOPIC_RE.fullmatch(topic) or topic.split("/")[1] == "deep":
            return value, (
                f"{topic!r} must be ask/<name> (up to 4 levels of letters, digits, '_', '-', "
                "'.'), not ask/deep"
            )
        if not isinstance(path, str) or not path:
            return value, f"{topic}: expected the path of a JSON Schema file, got {path!r}"
        out.append(TopicSchema(topic, path))
    return tuple(out), None


def _check_topic_kb(value: Any) -> tuple[Any, Optional[str]]:
    """`[mqtt.kb]`: `ask` or a topic under `ask/` mapped to true, false or collection names."""
    if not isinstance(value, dict):
        return value, 'expected a table like {"ask" = true, "ask/manuals" = ["line-4"]}'
    out = []
    for topic, given in value.items():
        kb = given
        if topic != "ask" and (
            not SCHEMA_TOPIC_RE.fullmatch(topic) or topic.split("/")[1] == "deep"
        ):
            return value, (
                f"{topic!r} must be ask or ask/<name> (up to 4 levels of letters, digits, '_', "
                "'-', '.'), not ask/deep"
            )
        if isinstance(kb, list):
            if (
                not kb
                or len(kb) > MAX_KB_COLLECTIONS
                or not all(isinstance(c, str) and 0 < len(c) <= 64 for c in kb)
            ):
                return value, (
                    f"{topic}: expected true, false or 1 to {MAX_KB_COLLECTIONS} collection "
                    f"names, got {kb!r}"
                )
            kb = tuple(given)
        elif not isinstance(kb, bool):
            return value, f"{topic}: expected true, false or a list of collection names, got {kb!r}"
        out.append(TopicKb(topic, kb))
    return tuple(out), None


def read_schema_file(path: Path, limits: Limits) -> Any:
    """The JSON Schema in the file at `path`, checked like a request's `format` within
    `limits`; raises ValueError with the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(MAX_SCHEMA_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_SCHEMA_FILE_BYTES:
        raise ValueError(f"larger than {MAX_SCHEMA_FILE_BYTES >> 20} MiB")
    try:
        schema = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not a JSON document: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("not a JSON Schema object")
    constraint_of(schema, None, limits)  # the same checks as a request's `format`
    return schema


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def format_limits(engine: EngineConfig) -> Limits:
    """What a `format` or `grammar` may cost on this box."""
    e = engine
    return Limits(e.format_max_bytes, e.format_max_depth, e.grammar_max_bytes, e.format_max_repeat)


def _check_redactions(value: Any) -> tuple[Any, Optional[str]]:
    expected = 'expected a list of [regex, placeholder] pairs, like [["SN-\\d+", "[serial]"]]'
    if not isinstance(value, list):
        return value, f"{expected}, got {value!r}"
    out = []
    for pair in value:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(v, str) for v in pair)
            or not pair[0]
        ):
            return value, f"{expected}, got {pair!r}"
        try:
            pattern = re.compile(pair[0])
        except re.error as exc:
            return value, f"{pair[0]!r} is not a valid regular expression: {exc}"
        problem = _placeholder_problem(pattern, pair[1])
        if problem:
            return value, f"{pair!r}: {problem}"
        out.append((pair[0], pair[1]))
    return tuple(out), None


def _placeholder_problem(pattern: re.Pattern[str], placeholder: str) -> Optional[str]:
    """Why `placeholder` cannot replace what `pattern` matches in policy.redact, or None.

    A group reference (\\g<0>, \\1, \\g<name>, \\g<+0>...) would copy the very text the rule
    removes into what leaves the box; a bad escape (\\q, \\g<9> with no group 9) would only
    show when a prompt matches, as an `internal` error for that escalation. A literal
    backslash is written \\\\.
    """
    # A stand-in with the same group numbers and names parses the template exactly as
    # `pattern` will, and always matches: expanded once with every group "a" and once with
    # every group "b", a placeholder that copies any matched text comes out different.
    names = {index: name for name, index in pattern.groupindex.items()}
    groups = "".join(
        f"(?P<{names[i]}>.)" if i in names else "(.)" for i in range(1, pattern.groups + 1)
    )
    stand_in = re.compile(f"{groups}.", re.DOTALL)
    try:
        expanded = {stand_in.sub(placeholder, c * (pattern.groups + 1)) for c in "ab"}
    except (re.error, IndexError) as exc:  # IndexError: an unknown group name (Python 3.11)
        return f"invalid placeholder: {exc}"
    if len(expanded) > 1:
        return "the placeholder refers to a group of the match: it would put back what it redacts"
    return None


def parse_listen(address: str) -> tuple[str, int]:
    """(host, port) of a "HOST:PORT" or "[IPv6]:PORT" address, or (path, 0) for a Unix socket
    path; raises ValueError saying what is wrong."""
    if address.startswith("/"):
        if len(address.encode()) > 107:
            raise ValueError(f"{address!r} is longer than the 107 bytes a Unix socket allows")
        return address, 0
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ValueError(
            f'expected "HOST:PORT", "[IPv6]:PORT" or a Unix socket path, got {address!r}'
        )
    if not re.fullmatch(r"\d{1,5}", port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Only this box can reach the address: a loopback IP, "localhost", a Unix socket."""
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


API_KEY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
API_KEY_RE = re.compile(r"[\x21-\x7e]{16,256}")  # printable ASCII, as an HTTP header carries it


def parse_api_keys(text: str) -> dict[str, str]:
    """{key: client name} from an API keys file: one `name: key` per line (blank lines and
    `#` comments skipped). Raises ValueError naming the line, never quoting a key."""
    keys: dict[str, str] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = (part.strip() for part in line.partition(":"))
        if not sep or not API_KEY_NAME_RE.fullmatch(name):
            raise ValueError(
                f"line {number}: expected `name: key` with a name of 1-64 letters, digits, "
                "'_', '-', '.'"
            )
        if not API_KEY_RE.fullmatch(key):
            # Neither part is quoted: in a line written the wrong way round, the name is the key.
            raise ValueError(
                f"line {number}: the key must be 16-256 printable ASCII characters without spaces"
            )
        if name in names:
            raise ValueError(f"line {number}: the name is given twice (first on an earlier line)")
        if key in keys:
            raise ValueError(f"line {number}: the key is the same as an earlier line's")
        keys[key] = name
        names.add(name)
    return keys


def api_keys_path(http: HttpConfig) -> tuple[str, bool]:
    """(path, named): the configured keys file, else the service's credential (which may be
    absent: then there are no keys)."""
    if http.api_keys_file:
        return http.api_keys_file, True
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return (str(Path(directory) / "http-api-keys") if directory else ""), False


def read_api_keys(http: HttpConfig) -> dict[str, str]:
    """The HTTP front end's keys ({} when none are configured). Raises OSError whose strerror
    is the whole reason, for a `file: http.api_keys_file: path: reason` line."""
    path, named = api_keys_path(http)
    if not path:
        return {}
    try:
        text = read_secret_file(path)
    except FileNotFoundError:
        if named:
            raise OSError(errno.ENOENT, "cannot read: no such file") from None
        return {}
    try:
        return parse_api_keys(text)
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None


def _check_listen(value: Any) -> tuple[Any, Optional[str]]:
    addresses = [value] if isinstance(value, str) else value
    if not isinstance(addresses, list) or not addresses:
        return value, f"expected an address or a non-empty list of addresses, got {value!r}"
    for address in addresses:
        if not isinstance(address, str):
            return value, f"expected an address string, got {type(address).__name__}"
        try:
            parse_listen(address)
        except ValueError as exc:
            return value, str(exc)
    if len(set(addresses)) != len(addresses):
        return value, "an address is listed twice"
    return tuple(addresses), None


def _check_value(key: str, value: Any, tp: Any, meta: Any) -> tuple[Any, Optional[str]]:
    kind = meta.get("kind")
    if kind == "cores":
        return _check_cores(value)
    if kind == "listen":
        return _check_listen(value)
    if kind in ("strings", "regexes"):
        return _check_strings(value, kind)
    if kind == "redactions":
        return _check_redactions(value)
    if kind == "schemas":
        return _check_schemas(value)
    if kind == "topic_kb":
        return _check_topic_kb(value)
    if key.endswith(".mode") and isinstance(value, str):
        if not re.fullmatch(r"0?o?[0-7]{3,4}", value):
            return value, f'expected an octal file mode like "0660", got {value!r}'
        value = int(value.replace("o", ""), 8)
    if tp is bool:
        if not isinstance(value, bool):
            return value, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"expected a finite number, got {value!r}"
    elif tp is str and not isinstance(value, str):
        return value, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and value < lo:
        return value, f"{value!r} is below the minimum {lo:g}"
    if hi is not None and value > hi:
        return value, f"{value!r} is above the maximum {hi:g}"
    if choices and value not in choices:
        return value, f"{value!r} is not one of {', '.join(choices)}"
    return value, None


def _build(cls: Any, raw: dict[str, Any], prefix: str, problems: list[str], src: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            problems.append(f"{src}: {dotted}: unknown key (known: {', '.join(sorted(known))})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{src}: {dotted}: expected a [{dotted}] table")
                continue
            values[key] = _build(tp, value, f"{dotted}.", problems, src)
            continue
        checked, problem = _check_value(dotted, value, tp, known[key].metadata)
        if problem:
            problems.append(f"{src}: {dotted}: {problem}")
        else:
            values[key] = checked
    return cls(**values)


def read_secret_file(path: str) -> str:
    """The UTF-8 text of the small regular file at `path` (a password), without its final line
    break. Raises OSError whose `strerror` is the whole reason, for a `file: key: reason` line.

    It must be a regular file, opened non-blocking: a FIFO or a device named by mistake must
    not hang the start, nor /dev/zero fill the memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, "not a regular file")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(SECRET_MAX_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > SECRET_MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {SECRET_MAX_BYTES >> 10} KiB: not a secret")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise OSError(errno.EILSEQ, f"not valid UTF-8: {exc.reason}") from None


def _no_passphrase() -> str:
    # paho's tls_set is given no pass phrase, and under systemd OpenSSL has no terminal to ask on.
    raise ValueError("the key is encrypted, and edgeagent has no pass phrase to give")


def _tls_problems(tls: TlsConfig) -> list[tuple[str, str]]:
    """(key, reason) for each TLS file that paho would fail to load at start, found by loading
    them as its tls_set does: a bad certificate is a problem line, not a traceback. Only for
    an enabled TLS table: with TLS off the files are never opened, so a path kept there for
    later (a sample config's, a broker not yet switched over) is no problem."""
    out: list[tuple[str, str]] = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if not path:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            out.append((key, f"{path}: cannot read: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(mode):  # a FIFO would hang the load below
            out.append((key, f"{path}: not a regular file"))
    if out:
        return out
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file:
        try:
            context.load_verify_locations(tls.ca_file)
        except OSError as exc:  # ssl.SSLError is one
            out.append(("ca_file", f"{tls.ca_file}: cannot load: {exc.strerror or exc}"))
    if tls.cert_file and tls.key_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            what = f"with cert_file {tls.cert_file} as a certificate and its private key"
            out.append(("key_file", f"{tls.key_file}: cannot load it {what}: {reason}"))
    return out


def _cross_check(cfg: Config, problems: list[str]) -> Config:
    src = cfg.source
    if cfg.model.max_tokens >= cfg.model.n_ctx:
        problems.append(
            f"{src}: model.max_tokens: {cfg.model.max_tokens} leaves no room for a prompt "
            f"in model.n_ctx = {cfg.model.n_ctx}"
        )
    if cfg.engine.parallel > cfg.model.n_batch:
        problems.append(
            f"{src}: engine.parallel: {cfg.engine.parallel} slots need model.n_batch >= "
            f"{cfg.engine.parallel} (one token each per step); n_batch is {cfg.model.n_batch}"
        )
    if cfg.model.sha256 and not re.fullmatch(r"[0-9a-f]{64}", cfg.model.sha256):
        problems.append(f"{src}: model.sha256: expected 64 lowercase hex digits")
    if cfg.model.sha256 and not cfg.model.path:
        problems.append(f"{src}: model.sha256: only meaningful with model.path")
    m, c, w = cfg.mqtt, cfg.cloud, cfg.worker
    topic_pieces = {
        "mqtt.topic_prefix": m.topic_prefix, "cloud.topic_prefix": c.topic_prefix,
        "mqtt.shared_group": m.shared_group, "worker.shared_group": w.shared_group,
        "mqtt.client_id": m.client_id, "cloud.client_id": c.client_id,
    }  # fmt: skip
    for key, value in topic_pieces.items():
        if CONTROL_RE.search(value):
            problems.append(
                f"{src}: {key}: {value!r} holds a control character, which MQTT topics and "
                "client ids must not"
            )
    if m.shared_group and not re.fullmatch(r"[^+#/]+", m.shared_group):
        problems.append(f"{src}: mqtt.shared_group: must not contain '/', '+' or '#'")
    for name, b in (("mqtt", m), ("cloud", c)):  # the two brokers' connection settings
        # An empty level ('a//b', or a '/' at either end) is legal MQTT, but here it is a typo
        # that leaves the clients subscribed to the intended prefix hearing nothing.
        if not re.fullmatch(r"[^+#$][^+#]*", b.topic_prefix) or "" in b.topic_prefix.split("/"):
            problems.append(
                f"{src}: {name}.topic_prefix: {b.topic_prefix!r} must be a topic without "
                "wildcards or empty levels, not starting with '$' or '/', not ending with '/'"
            )
        if b.reconnect_max_s < b.reconnect_min_s:
            problems.append(f"{src}: {name}.reconnect_max_s: below {name}.reconnect_min_s")
        if (b.tls.cert_file == "") != (b.tls.key_file == ""):
            problems.append(f"{src}: {name}.tls: cert_file and key_file go together")
        if b.enabled and b.tls.enabled:
            for key, reason in _tls_problems(b.tls):
                problems.append(f"{src}: {name}.tls.{key}: {reason}")
        if b.enabled and b.password_file:
            try:  # read now as at start: as the service's user, every way it can fail
                read_secret_file(b.password_file)
            except OSError as exc:
                problems.append(f"{src}: {name}.password_file: {b.password_file}: {exc.strerror}")
    if cfg.escalation.enabled and not c.enabled:
        problems.append(
            f"{src}: escalation.enabled: needs the cloud broker: set [cloud] enabled = true"
        )
    if not re.fullmatch(r"[^+#/]+", w.shared_group):
        problems.append(f"{src}: worker.shared_group: must be non-empty without '/', '+', '#'")
    # fullmatch: NODE_ID_RE's '$' would also match before a final newline
    if w.worker_id and not NODE_ID_RE.fullmatch(w.worker_id):
        problems.append(f"{src}: worker.worker_id: 1-64 of letters, digits, '_', '-', '.'")
    if not re.match(r"https?://", w.base_url):
        problems.append(f"{src}: worker.base_url: expected an http:// or https:// URL")
    embedding_model = cfg.kb.embedding_model
    if embedding_model and not Path(embedding_model).is_file():
        problems.append(f"{src}: kb.embedding_model: {embedding_model}: no such file")
    elif embedding_model and not os.access(embedding_model, os.R_OK):
        problems.append(f"{src}: kb.embedding_model: {embedding_model}: not readable by this user")
    for front_end in cfg.kb.front_ends:
        if front_end not in ("socket", "mqtt", "http"):
            problems.append(f"{src}: kb.front_ends: {front_end!r} is not socket, mqtt or http")
    if m.enabled and m.schemas:
        cfg = dataclasses.replace(
            cfg, mqtt=dataclasses.replace(m, schemas=_read_schemas(cfg, problems))
        )
    if not cfg.socket.path:
        problems.append(f"{src}: socket.path: must not be empty")
    elif len(cfg.socket.path.encode()) > 107:
        problems.append(f"{src}: socket.path: longer than the 107 bytes a Unix socket allows")
    if cfg.http.enabled:
        _http_problems(cfg.http, src, problems)
    node_id = cfg.node_id or socket.gethostname().split(".")[0]
    if not NODE_ID_RE.fullmatch(node_id):
        problems.append(
            f"{src}: node_id: {node_id!r} must be 1-64 of letters, digits, '_', '-', '.' "
            "(it becomes part of MQTT topics)"
        )
    return dataclasses.replace(cfg, node_id=node_id)


def _read_schemas(cfg: Config, problems: list[str]) -> tuple[TopicSchema, ...]:
    """Each `[mqtt.schemas]` file read and checked now, as at start; a relative path is
    relative to the config file's directory."""
    base = Path(cfg.source).parent if Path(cfg.source).is_file() else Path.cwd()
    limits = format_limits(cfg.engine)
    out = []
    for ts in cfg.mqtt.schemas:
        path = base / ts.path
        try:
            out.append(dataclasses.replace(ts, schema=read_schema_file(path, limits)))
        except ValueError as exc:
            problems.append(f'{cfg.source}: mqtt.schemas."{ts.topic}": {path}: {exc}')
    return tuple(out)


def _http_problems(http: HttpConfig, src: str, problems: list[str]) -> None:
    try:  # read now as at start: as the service's user, every way it can fail
        keys = read_api_keys(http)
    except OSError as exc:
        problems.append(f"{src}: http.api_keys_file: {api_keys_path(http)[0]}: {exc.strerror}")
        return
    if not keys:
        for address in http.listen:
            host, _port = parse_listen(address)
            if not is_loopback(host):
                problems.append(
                    f"{src}: http.listen: {address} is reachable from other machines, so "
                    "clients must present a key: set http.api_keys_file (or pass the "
                    "http-api-keys credential)"
                )
    if (http.tls_cert_file == "") != (http.tls_key_file == ""):
        problems.append(f"{src}: http.tls_cert_file: goes together with http.tls_key_file")
    elif http.tls_cert_file:
        try:
            server_tls(http)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(
                f"{src}: http.tls_key_file: {http.tls_key_file}: cannot load it with "
                f"tls_cert_file {http.tls_cert_file}: {reason}"
            )


def server_tls(http: HttpConfig) -> Optional[ssl.SSLContext]:
    """The HTTPS context for the configured certificate and key (None for plain HTTP)."""
    if not http.tls_cert_file:
        return None
    for path in (http.tls_cert_file, http.tls_key_file):
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang the load
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(http.tls_cert_file, http.tls_key_file, password=_no_passphrase)
    return context


def parse(text: str, source: str) -> Config:
    """Parse and validate TOML text; raises ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: invalid TOML: nested too deeply"]) from None
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems, source)
    cfg = dataclasses.replace(cfg, source=source)
    cfg = _cross_check(cfg, problems)
    if problems:
        raise ConfigError(problems)
    result: Config = cfg
    return result


def load(path: Optional[str]) -> Config:
    """Load a config file, or the embedded default config when `path` is None."""
    if path is None:
        text = resources.files("edgeagent").joinpath(DEFAULT_CONFIG_RESOURCE).read_text()
        return parse(text, "<embedded default config>")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8: {exc.reason}"]) from None
    return parse(text, path)


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every key: used by `edgeagent config keys` and the docs."""
    out: list[tuple[str, Any, str]] = []

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out.append((prefix + f.name, f.default, f.metadata.get("doc", "")))

    walk(Config, "")
    return out
