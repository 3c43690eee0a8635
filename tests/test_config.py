"""Config loading: every problem reported as `file: key: reason`, exit code 2 at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent import config
from edgeagent._toml import tomllib


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

    commented = {"node_id", "model.path", "model.sha256", "cpu.sysfs_root"}
    documented = {key for key, _, _ in config.describe_keys()}
    assert documented - commented == keys(raw)
    text = path.read_text()
    assert all(f"# {k.split('.')[-1]} =" in text for k in commented - {"cpu.sysfs_root"})


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
    ],
)
def test_problems_name_file_key_and_reason(text: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "t.toml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


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
