"""Config loading: every problem reported as `file: key: reason`, exit code 2 at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent import config, policy
from edgeagent._toml import tomllib
from edgeagent.mqtt_client import SecretError, read_secret
from tests.conftest import config_text


def test_embedded_default_config_is_valid() -> None:
    cfg = config.load(None)
    assert cfg.socket.path == "run/edgeagent.sock"
    assert cfg.socket.mode == 0o660
    assert cfg.mqtt.enabled is False
    assert cfg.model.n_ctx == 4096
    assert cfg.node_id  # defaults to the host name


def test_example_config_is_valid() -> None:
    cfg = config.load(str(Path(__file__).parent.parent / "edgeagent.example.toml"))
    assert cfg.engine.queue_size == 16


def test_example_config_shows_every_key() -> None:
    path = Path(__file__).parent.parent / "edgeagent.example.toml"
    raw = tomllib.loads(path.read_text())

    def keys(table: dict[str, object], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in table.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    commented = {
        "node_id",
        "model.path",
        "model.sha256",
        "cpu.sysfs_root",
        "mqtt.schemas",
        "mqtt.kb",
    }
    documented = {key for key, _, _ in config.describe_keys()}
    assert documented - commented == keys(raw)
    text = path.read_text()
    assert all(f"# {k.split('.')[-1]} =" in text for k in commented)


def test_values_are_read() -> None:
    cfg = config.parse(
        'node_id = "line-7"\n[model]\nn_ctx = 1024\nmax_tokens = 64\n'
        '[socket]\npath = "/tmp/x.sock"\nmode = "0600"\n[mqtt]\nenabled = false\n'
        'host = "broker"\nport = 8883\n',
        "t.toml",
    )
    assert (cfg.node_id, cfg.model.n_ctx, cfg.model.max_tokens) == ("line-7", 1024, 64)
    assert (cfg.socket.path, cfg.socket.mode) == ("/tmp/x.sock", 0o600)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 8883)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nn_ctx = 'big'\n", "t.toml: model.n_ctx: expected an integer, got str 'big'"),
        ("[model]\nn_ctx = 10\n", "t.toml: model.n_ctx: 10 is below the minimum 256"),
        ("[mqtt]\nport = 70000\n", "t.toml: mqtt.port: 70000 is above the maximum 65535"),
        ("[mqtt]\nenabled = 1\n", "t.toml: mqtt.enabled: expected true or false, got int 1"),
        ("[model]\nmax_tokens = true\n", "t.toml: model.max_tokens: expected an integer"),
        ("[socket]\nmode = '999'\n", "t.toml: socket.mode: expected an octal file mode"),
        ("[socket]\npaht = 'x'\n", "t.toml: socket.paht: unknown key"),
        ("[sockets]\npath = 'x'\n", "t.toml: sockets: unknown key"),
        ("model = 3\n", "t.toml: model: expected a [model] table"),
        ("node_id = 'a/b'\n", "t.toml: node_id: 'a/b' must be 1-64 of letters"),
        ("[model]\nn_ctx = 512\nmax_tokens = 512\n", "t.toml: model.max_tokens: 512 leaves no"),
        ("[log]\nlevel = 'loud'\n", "t.toml: log.level: 'loud' is not one of"),
        ("[engine]\nrequest_timeout_s = nan\n", "t.toml: engine.request_timeout_s: expected a"),
        ("[model\n", "t.toml: invalid TOML"),
        # A cpulist is range-checked piece by piece before it is expanded.
        ("[cpu]\ncores = '0-20000000'\n", "t.toml: cpu.cores: core numbers go from 0 to 4095, got"),
        ("[cpu]\nio_cores = '2,0-4096'\n", "t.toml: cpu.io_cores: core numbers go from 0 to 4095"),
        (f"[cpu]\ncores = '{'9' * 5000}'\n", "t.toml: cpu.cores: core numbers go from 0 to 4095"),
        ("[cpu]\ncores = [0, 4096]\n", "t.toml: cpu.cores: core numbers go from 0 to 4095"),
        ("[cpu]\ncores = '0,5-2'\n", "t.toml: cpu.cores: a range goes from the lower core to"),
        ("[cpu]\ncores = '0-3,x'\n", 't.toml: cpu.cores: expected "auto", a list of core numbers'),
        # A placeholder that refers to the match would put the redacted text back ...
        (
            r"escalation = {redact = [['S[0-9]+', '\g<0>']]}",
            r"t.toml: escalation.redact: ['S[0-9]+', '\\g<0>']: the placeholder refers to a group",
        ),
        (
            r"escalation = {redact = [['(S)[0-9]+', 'x\1']]}",
            r"t.toml: escalation.redact: ['(S)[0-9]+', 'x\\1']: the placeholder refers to a",
        ),
        (
            r"escalation = {redact = [['(?P<n>[0-9]+)', '\g<n>']]}",
            r"t.toml: escalation.redact: ['(?P<n>[0-9]+)', '\\g<n>']: the placeholder refers",
        ),
        pytest.param(  # group 0 too, in Python 3.11; an error from 3.12
            r"escalation = {redact = [['S[0-9]+', '\g<+0>']]}",
            r"t.toml: escalation.redact: ['S[0-9]+', '\\g<+0>']: the placeholder refers to a",
            marks=pytest.mark.filterwarnings("ignore:bad character in group name"),
        ),
        # ... and one that cannot be parsed would fail every escalation that matches.
        (
            r"escalation = {redact = [['S[0-9]+', '\q']]}",
            r"t.toml: escalation.redact: ['S[0-9]+', '\\q']: invalid placeholder: bad escape \q",
        ),
        (
            r"escalation = {redact = [['S[0-9]+', '\g<9>']]}",
            r"t.toml: escalation.redact: ['S[0-9]+', '\\g<9>']: invalid placeholder: invalid",
        ),
        (
            r"escalation = {redact = [['S[0-9]+', '\g<x>']]}",
            r"t.toml: escalation.redact: ['S[0-9]+', '\\g<x>']: invalid placeholder: unknown",
        ),
        # Control characters in any piece of a topic or a client id, and empty topic levels.
        ('[mqtt]\ntopic_prefix = "a\\u0000b"\n', r"t.toml: mqtt.topic_prefix: 'a\x00b' holds a"),
        ('[cloud]\ntopic_prefix = "a\\tb"\n', r"t.toml: cloud.topic_prefix: 'a\tb' holds a"),
        ('[mqtt]\nshared_group = "g\\u0000"\n', r"t.toml: mqtt.shared_group: 'g\x00' holds"),
        ('[worker]\nshared_group = "g\\u007f"\n', r"t.toml: worker.shared_group: 'g\x7f' hold"),
        ('[mqtt]\nclient_id = "c\\u0085"\n', r"t.toml: mqtt.client_id: 'c\x85' holds a"),
        ('[cloud]\nclient_id = "c\\n"\n', r"t.toml: cloud.client_id: 'c\n' holds a"),
        ('node_id = "line-7\\n"\n', r"t.toml: node_id: 'line-7\n' must be 1-64"),
        ('[worker]\nworker_id = "w\\n"\n', "t.toml: worker.worker_id: 1-64 of letters"),
        ("[mqtt]\ntopic_prefix = 'plant//line'\n", "t.toml: mqtt.topic_prefix: 'plant//line' must"),
        ("[cloud]\ntopic_prefix = '/plant'\n", "t.toml: cloud.topic_prefix: '/plant' must be"),
        # HTTP: addresses, keys where other machines can reach it, TLS files in pairs.
        ('[http]\nlisten = "8080"\n', 't.toml: http.listen: expected "HOST:PORT"'),
        ('[http]\nlisten = "127.0.0.1:99999"\n', "t.toml: http.listen: port '99999' is not"),
        ("[http]\nlisten = []\n", "t.toml: http.listen: expected an address or a non-empty"),
        ('[http]\nlisten = ["127.0.0.1:1", "127.0.0.1:1"]\n', "t.toml: http.listen: an address"),
        ('[http]\nlisten = "0.0.0.0:8080"\n', "t.toml: http.listen: 0.0.0.0:8080 is reachable"),
        ('[http]\nlisten = "[::]:8080"\n', "t.toml: http.listen: [::]:8080 is reachable"),
        ('[http]\nlisten = "box.local:8080"\n', "t.toml: http.listen: box.local:8080 is reach"),
        (
            '[http]\napi_keys_file = "/nonexistent/keys"\n',
            "t.toml: http.api_keys_file: /nonexistent/keys: cannot read",
        ),
        ('[http]\ntls_cert_file = "/etc/hostname"\n', "t.toml: http.tls_cert_file: goes together"),
    ],
)
def test_problems_name_file_key_and_reason(text: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "t.toml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_mqtt_schemas_are_read_at_start_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    alarm = {"type": "object", "properties": {"severity": {"enum": ["info", "stop_line"]}}}
    (tmp_path / "schemas" / "alarm.json").write_text(json.dumps(alarm))
    cfg_file = tmp_path / "edgeagent.toml"
    cfg_file.write_text(
        '[mqtt]\nenabled = true\n[mqtt.schemas]\n"ask/alarm" = "schemas/alarm.json"\n'
    )
    cfg = config.load(str(cfg_file))
    assert [(s.topic, s.schema) for s in cfg.mqtt.schemas] == [("ask/alarm", alarm)]

    def problems(table: str, enabled: bool = True) -> list[str]:
        cfg_file.write_text(f"[mqtt]\nenabled = {str(enabled).lower()}\n[mqtt.schemas]\n{table}")
        try:
            config.load(str(cfg_file))
        except config.ConfigError as exc:
            return exc.problems
        return []

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nonschema.json").write_text('{"type": "object", "required": "severity"}')
    (tmp_path / "huge.json").write_text(json.dumps({"enum": ["x" * 100] * 200}))
    where = f"{cfg_file}: mqtt.schemas."
    for table, expected in [
        ('"ask/deep" = "x.json"\n', "'ask/deep' must be ask/<name>"),
        ('"alarm" = "x.json"\n', "'alarm' must be ask/<name>"),
        ('"ask/a+" = "x.json"\n', "'ask/a+' must be ask/<name>"),
        ('"ask/alarm" = ""\n', "ask/alarm: expected the path"),
        ('"ask/alarm" = "missing.json"\n', f'"ask/alarm": {tmp_path}/missing.json: cannot read'),
        ('"ask/alarm" = "bad.json"\n', '"ask/alarm": ' + f"{tmp_path}/bad.json: not a JSON doc"),
        (
            '"ask/alarm" = "nonschema.json"\n',
            f'"ask/alarm": {tmp_path}/nonschema.json: `format` is not a valid',
        ),
        (
            '"ask/alarm" = "huge.json"\n',
            f'"ask/alarm": {tmp_path}/huge.json: `format` is a schema of more',
        ),
    ]:
        found = problems(table)
        assert any(
            p.startswith(where + expected) or p.startswith(f"{cfg_file}: mqtt.schemas: {expected}")
            for p in found
        ), (table, found)
    assert problems('"ask/alarm" = "missing.json"\n', enabled=False) == []


@pytest.mark.parametrize("table, expected", [
    ('"ask/deep" = true', "mqtt.kb: 'ask/deep' must be ask or ask/<name>"),
    ('"manuals" = true', "mqtt.kb: 'manuals' must be ask or ask/<name>"),
    ('"ask/manuals" = "yes"', "mqtt.kb: ask/manuals: expected true, false or a list"),
    ('"ask/manuals" = []', "mqtt.kb: ask/manuals: expected true, false or 1 to 16"),
    ('"ask/manuals" = [""]', "mqtt.kb: ask/manuals: expected true, false or 1 to 16"),
    ('"ask/manuals" = [3]', "mqtt.kb: ask/manuals: expected true, false or 1 to 16"),
])  # fmt: skip
def test_mqtt_kb_topics_are_checked(table: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(f"[mqtt]\nenabled = true\n[mqtt.kb]\n{table}\n", "t.toml")
    assert any(p.startswith(f"t.toml: {expected}") for p in info.value.problems), info.value


def test_mqtt_kb_topics_are_read() -> None:
    cfg = config.parse(
        '[mqtt.kb]\n"ask" = true\n"ask/manuals" = ["line-4", "common"]\n"ask/alarm" = false\n',
        "t.toml",
    )
    assert cfg.mqtt.kb == (
        config.TopicKb("ask", True),
        config.TopicKb("ask/manuals", ("line-4", "common")),
        config.TopicKb("ask/alarm", False),
    )


def test_http_needs_no_keys_on_loopback_and_unix_sockets() -> None:
    cfg = config.parse('[http]\nlisten = ["127.0.0.1:8080", "[::1]:8080", "localhost:81", '
                       '"/run/edgeagent/http.sock"]\n', "t.toml")  # fmt: skip
    assert cfg.http.listen[3] == "/run/edgeagent/http.sock"
    assert config.parse("[http]\nenabled = false\nlisten = '0.0.0.0:80'\n", "t.toml")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("line-3 k3-0123456789abcdef\n", "line 1: expected `name: key`"),
        ("line-3: short\n", "line 1: the key must be 16-256"),
        ("# ok\n\na: 0123456789abcdef\na: fedcba9876543210\n", "line 4: the name is given twice"),
        ("a: 0123456789abcdef\nb: 0123456789abcdef\n", "line 2: the key is the same as an"),
        ("0123456789abcdef: kiosk\n", "line 1: the key must be 16-256"),
        ("a b: 0123456789abcdef\n", "line 1: expected `name: key`"),
    ],
)
def test_api_keys_file_problems_name_the_line_never_the_key(
    tmp_path: Path, text: str, reason: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.parse(f'[http]\napi_keys_file = "{keys}"\nlisten = "0.0.0.0:80"\n', "t.toml")
    [problem] = info.value.problems
    assert problem.startswith(f"t.toml: http.api_keys_file: {keys}: {reason}")
    assert "0123456789abcdef" not in str(info.value)


def test_api_keys_come_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "http-api-keys").write_text("kiosk-1: 0123456789abcdef0123\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.parse('[http]\nlisten = "0.0.0.0:80"\n', "t.toml")
    assert config.read_api_keys(cfg.http) == {"0123456789abcdef0123": "kiosk-1"}


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse("bogus = 1\n[model]\nn_ctx = -1\n[socket]\nmode = 'x'\n", "t.toml")
    assert len(info.value.problems) == 3


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, timeout=60
    )


def test_config_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[model]\nn_ctx = 2048\n")
    ok = run_cli("config", "check", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_ctx = 'x'\ncolour = 1\n")
    res = run_cli("config", "check", str(bad))
    assert res.returncode == 2
    assert f"{bad}: model.n_ctx: expected an integer" in res.stderr
    assert f"{bad}: model.colour: unknown key" in res.stderr


def test_daemon_refuses_to_start_on_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nqueue_size = 0\n")
    res = run_cli("run", "--config", str(bad))
    assert res.returncode == 2
    assert f"{bad}: engine.queue_size: 0 is below the minimum 1" in res.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    res = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_placeholders_without_group_references_load_and_redact() -> None:
    cfg = config.parse(
        r"escalation = {redact = [['SN-[0-9]+', '[serial \\ \n \0]'], ['(a)(?P<b>b)', '']]}",
        "t.toml",
    )
    rules = policy.Rules.from_config(cfg.escalation)
    assert policy.redact("SN-123456 at ab", rules) == "[serial \\ \n \0] at "


SECRET_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "directory": (lambda p: p.mkdir(), "cannot read: Is a directory"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xffpw\n"), "not valid UTF-8: invalid start byte"),
    # a FIFO with no writer would block a plain open() for good
    "FIFO": (os.mkfifo, "cannot read: not a regular file"),
    "too large": (lambda p: p.write_bytes(b"x" * (65 << 10)), "larger than 64 KiB: not a secret"),
    "missing": (lambda p: None, "cannot read: No such file or directory"),
}


@pytest.mark.parametrize("kind", SECRET_FILES)
@pytest.mark.parametrize("section", ["mqtt", "cloud"])
def test_password_file_is_read_when_the_config_is_loaded(
    tmp_path: Path, section: str, kind: str
) -> None:
    make, reason = SECRET_FILES[kind]
    secret = tmp_path / "password"
    make(secret)
    text = f'[{section}]\nenabled = true\nusername = "u"\npassword_file = "{secret}"\n'
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "t.toml")
    assert f"t.toml: {section}.password_file: {secret}: {reason}" in info.value.problems


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"ca_file": "ca.pem"}, "mqtt.tls.ca_file: @/ca.pem: cannot load: [X509: NO_CERT"),
        ({"ca_file": "certs"}, "mqtt.tls.ca_file: @/certs: not a regular file"),
        ({"ca_file": "none.pem"}, "mqtt.tls.ca_file: @/none.pem: cannot read: No such file"),
        (
            {"cert_file": "ca.pem", "key_file": "ca.pem"},
            "mqtt.tls.key_file: @/ca.pem: cannot load it with cert_file @/ca.pem as a "
            "certificate and its private key: [SSL]",
        ),
    ],
)
def test_tls_files_are_loaded_when_the_config_is_loaded(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "certs").mkdir()
    lines = "".join(f'{key} = "{tmp_path / name}"\n' for key, name in files.items())
    text = f"[mqtt]\nenabled = true\n[mqtt.tls]\nenabled = true\n{lines}"
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "t.toml")
    want = f"t.toml: {expected.replace('@', str(tmp_path))}"
    assert any(p.startswith(want) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("section", ["mqtt", "cloud"])
def test_tls_files_are_not_checked_while_tls_is_off(tmp_path: Path, section: str) -> None:
    """docs/mqtt.md's sample keeps a ca_file with TLS off: the client never opens it, so
    neither may the check. Turning TLS on makes the same file a problem."""
    missing = tmp_path / "ca.pem"
    tls = f'ca_file = "{missing}"\ncert_file = "{missing}"\nkey_file = "{missing}"\n'
    text = f"[{section}]\nenabled = true\n[{section}.tls]\nenabled = false\n{tls}"
    cfg = config.parse(text, "t.toml")
    assert getattr(cfg, section).tls.ca_file == str(missing)
    with pytest.raises(config.ConfigError) as info:
        config.parse(text.replace("enabled = false", "enabled = true"), "t.toml")
    assert f"t.toml: {section}.tls.ca_file: {missing}: cannot read: No such file or directory" in (
        info.value.problems
    )


def test_daemon_refuses_an_unreadable_password_file_before_loading_the_model(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "password"
    secret.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[mqtt]\nenabled = true\nusername = "u"\npassword_file = "{secret}"\n')
    for args in (("config", "check", str(cfg)), ("run", "--config", str(cfg))):
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert f"{cfg}: mqtt.password_file: {secret}: cannot read: Is a directory" in res.stderr
        assert "Traceback" not in res.stderr


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory anyone may enter holding `secret/`, which only root may (mode 0700):
    systemd's credentials directory as another user sees it."""
    top = Path(tempfile.mkdtemp(prefix="edgeagent-cfg-"))
    try:
        top.chmod(0o755)
        (top / "secret").mkdir(mode=0o700)
        (top / "secret" / "mqtt-password").write_text("s3cret\n")
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as nobody")
def test_config_check_as_a_user_who_may_not_read_the_password_file(private_dir: Path) -> None:
    """The real EACCES, from the kernel: `config check` run as uid 65534."""
    secret = private_dir / "secret" / "mqtt-password"
    cfg = private_dir / "c.toml"
    cfg.write_text(f'[mqtt]\nenabled = true\nusername = "u"\npassword_file = "{secret}"\n')
    cfg.chmod(0o644)
    res = subprocess.run(
        [sys.executable, "-c", AS_NOBODY + CONFIG_CHECK, str(cfg)],
        cwd="/", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"{cfg}: mqtt.password_file: {secret}: cannot read: Permission denied" in res.stderr
    assert "Traceback" not in res.stderr


# The code runs as uid 65534 from the point it drops root, after its imports: a checkout
# under a home that only its owner may enter (a fresh clone in /root) still imports, and the
# file reads after the drop meet the kernel's real permission checks.
AS_NOBODY = """
import os, sys
from edgeagent import cli, mqtt_client
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
"""
CONFIG_CHECK = """
sys.exit(cli.main(["config", "check", sys.argv[1]]))
"""
READ_CREDENTIAL = """
from edgeagent.mqtt_client import SecretError, read_secret
try:
    print(read_secret("", "mqtt-password", "mqtt.password_file"))
except SecretError as exc:
    print(exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as nobody")
def test_credential_the_service_user_may_not_read_is_a_secret_error(private_dir: Path) -> None:
    """$CREDENTIALS_DIRECTORY/mqtt-password read as uid 65534: the real EACCES is one line."""
    creds = private_dir / "secret"
    res = subprocess.run(
        [sys.executable, "-c", AS_NOBODY + READ_CREDENTIAL], cwd="/", capture_output=True,
        text=True, timeout=60, check=False,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    expected = f"mqtt.password_file: {creds}/mqtt-password: cannot read: Permission denied"
    assert res.stdout.strip() == expected


def test_read_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\r\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("", "mqtt-password") == "s3cret"
    assert read_secret("", "cloud-password") is None  # a credential not passed in
    (tmp_path / "cloud-password").mkdir()
    with pytest.raises(SecretError) as info:
        read_secret("", "cloud-password", "cloud.password_file")
    assert info.value.key == "cloud.password_file"
    assert info.value.reason == "cannot read: Is a directory"
    with pytest.raises(SecretError) as info:  # a file the config names must be there
        read_secret(str(tmp_path / "nope"), "mqtt-password", "mqtt.password_file")
    assert str(info.value).endswith("nope: cannot read: No such file or directory")


CREDENTIAL_CONFIGS = {
    "mqtt": ('[mqtt]\nenabled = true\nusername = "u"\n', "mqtt-password"),
    "cloud": (
        '[cloud]\nenabled = true\nusername = "u"\n[escalation]\nenabled = true\n'
        'spool_path = "@/spool.sqlite"\n',
        "cloud-password",
    ),
}


@pytest.mark.parametrize("link", CREDENTIAL_CONFIGS)
@pytest.mark.parametrize("kind", ["directory", "not UTF-8"])
def test_daemon_exits_2_on_a_credential_it_cannot_read(
    tmp_path: Path, model_file: Path, link: str, kind: str
) -> None:
    """A real start under $CREDENTIALS_DIRECTORY: one `file: key: reason` line and exit 2
    (which the unit does not restart), never a traceback, and nothing ever listened."""
    extra, credential = CREDENTIAL_CONFIGS[link]
    make, reason = SECRET_FILES[kind]
    creds = tmp_path / "credentials"
    creds.mkdir()
    make(creds / credential)
    sock = tmp_path / "edgeagent.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text().replace("@SOCKET@", str(sock)) + extra.replace("@", str(tmp_path)))
    res = subprocess.run(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds),
             "CACHE_DIRECTORY": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"{cfg}: {link}.password_file: {creds / credential}: {reason}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not sock.exists()


toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(alphabet="abc0123456789 ./-", max_size=12),
)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    return repr(v)


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(["model", "engine", "socket", "mqtt", "log", "bogus"]),
    key=st.sampled_from(
        ["n_ctx", "max_tokens", "path", "mode", "port", "enabled", "level", "queue_size", "x"]
    ),
    value=toml_scalars,
)
def test_any_single_key_either_loads_or_fails_with_a_keyed_message(
    section: str, key: str, value: object
) -> None:
    text = f"[{section}]\n{key} = {_toml_value(value)}\n"
    try:
        config.parse(text, "f.toml")
    except config.ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("f.toml: ") for p in exc.problems)
