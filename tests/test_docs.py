"""The documents against the code, with no model loaded: every TOML sample in README.md and
docs/*.md passes the real `edgeagent config check`, every `edgeagent ...` command they show
parses with the real CLI and every command is shown, the example config shows every key, and
docs/protocol.md names exactly the error codes, ops and events the code has.

A fenced ```toml block is checked as a whole config file: every key is optional, so a sample
that shows only the part a page is about must still be valid on its own. Paths of files that
`config check` would open are pointed at placeholders made here, as a user would point them at
their own files.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from edgeagent import cli, config, protocol
from scripts.fresh_box import README_PACKAGES
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = ROOT / "edgeagent.example.toml"
FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
INLINE_CODE_RE = re.compile(r"`([^`\n]+)`")
# `edgeagent` where a shell would run it: at the start of a line or span, after a prompt or an
# operator, after sudo, or as the last part of a path (.venv/bin/edgeagent). Not `sudo -u
# edgeagent`, `systemctl status edgeagent` or the edgeagent/... topics.
COMMAND_RE = re.compile(r"(?:^|(?<=[$|;&(] )|(?<=sudo )|(?<=/))edgeagent +(?=[a-z-])", re.M)
SHELL_OPERATOR_RE = re.compile(r"^[|&;<>()]+$")
# Keys whose value names a file or directory; Placeholders makes what stands in for each.
FILE_KEYS = ("password_file", "api_key_file", "api_keys_file", "ca_file", "cert_file",
             "key_file", "tls_cert_file", "tls_key_file", "spool_path",
             "prefix_cache_dir", "embedding_model")  # fmt: skip
# Events the code sends to clients; the scan below must find at least these.
CLIENT_EVENTS = {"token", "restart", "done", "error", "cloud_answer", "status", "cancel",
                 "reset", "result"}  # fmt: skip
FINISH_REASONS = {"stop", "length", "queued"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def fenced_blocks(lang: str) -> list[tuple[str, str]]:
    """(file:line, text) of every fenced block of language `lang` in the documents."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE_RE.finditer(text):
            if m.group(1) == lang:
                out.append((f"{rel(doc)}:{line_of(text, m.start())}", m.group(2)))
    return out


TOML_SAMPLES = [*fenced_blocks("toml"), (rel(EXAMPLE), EXAMPLE.read_text())]


class Placeholders:
    """Files made on demand for the paths a sample names: a secret, a self-signed certificate
    and its key (loadable as a CA, or as a client certificate and key), a spool, a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tls: tuple[Path, Path] | None = None

    def for_key(self, key: str) -> Path:
        if key in ("password_file", "api_key_file"):
            path = self.root / key
            path.write_text("placeholder\n")
            return path
        if key == "api_keys_file":
            path = self.root / key
            path.write_text("terminal-1: placeholder-key-0123456789\n")
            return path
        if key in ("ca_file", "cert_file", "key_file", "tls_cert_file", "tls_key_file"):
            crt, pem = self.tls()
            return pem if key.endswith("key_file") else crt
        if key == "prefix_cache_dir":
            (self.root / "prefix").mkdir(exist_ok=True)
            return self.root / "prefix"
        if key == "embedding_model":  # config check only looks for the file
            path = self.root / "embed.gguf"
            path.write_bytes(b"GGUF")
            return path
        return self.root / "spool.sqlite"

    def tls(self) -> tuple[Path, Path]:
        if self._tls is None:
            from tests.test_security_mqtt import make_ca  # noqa: PLC0415 (needs openssl)

            try:
                self._tls = make_ca(self.root, "placeholder")
            except FileNotFoundError:
                pytest.fail("openssl is needed to make placeholder TLS files (make system-deps)")
        return self._tls


def with_placeholders(sample: str, files: Placeholders) -> str:
    """The sample with each non-empty path of FILE_KEYS pointing at a placeholder."""
    pattern = re.compile(rf'^(\s*({"|".join(FILE_KEYS)})\s*=\s*)"([^"]+)"', re.MULTILINE)
    return pattern.sub(lambda m: f'{m.group(1)}"{files.for_key(m.group(2))}"', sample)


def test_there_are_samples_to_check() -> None:
    where = {w.split(":")[0] for w, _ in TOML_SAMPLES}
    assert {"docs/mqtt.md", "docs/escalation.md", "edgeagent.example.toml"} <= where, where


@pytest.mark.parametrize(("where", "sample"), TOML_SAMPLES, ids=[w for w, _ in TOML_SAMPLES])
def test_toml_sample_passes_config_check(tmp_path: Path, where: str, sample: str) -> None:
    path = tmp_path / "sample.toml"
    path.write_text(with_placeholders(sample, Placeholders(tmp_path)))
    res = subprocess.run(
        [sys.executable, "-m", "edgeagent", "config", "check", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = res.stderr.replace(str(path), where)
    assert res.returncode == 0, (
        f"{where}: `edgeagent config check` refuses this sample:\n{problems}"
    )


# --- commands ---------------------------------------------------------------------------------


def shown_commands() -> list[tuple[str, list[str]]]:
    """(file:line, arguments) of every `edgeagent ...` in a code block or span of the docs,
    cut at the first shell operator or comment, with the brackets of optional parts removed."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        code = [(m.start(2), m.group(2)) for m in FENCE_RE.finditer(text)]
        # Spans outside the blocks; blanked, not removed, so offsets stay those of `text`.
        prose = FENCE_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
        code += [(m.start(1), m.group(1)) for m in INLINE_CODE_RE.finditer(prose)]
        for offset, snippet in code:
            for m in COMMAND_RE.finditer(snippet):
                rest = snippet[m.end() :].split("\n", 1)[0]
                where = f"{rel(doc)}:{line_of(text, offset) + line_of(snippet, m.start()) - 1}"
                lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                args = []
                try:
                    for token in lexer:
                        if SHELL_OPERATOR_RE.match(token):
                            break
                        args.append(token.replace("[", "").replace("]", ""))
                except ValueError as exc:
                    pytest.fail(f"{where}: cannot read `edgeagent {rest}` as a command: {exc}")
                out.append((where, [a for a in args if a]))
    return out


class Refused(Exception):
    pass


def _refuse(_parser: argparse.ArgumentParser, message: str) -> NoReturn:
    raise Refused(message)


def _exit(
    _parser: argparse.ArgumentParser, status: int = 0, message: str | None = None
) -> NoReturn:
    raise Refused(message or "") if status else SystemExit(0)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices: dict[str, argparse.ArgumentParser] = action.choices
    return choices


def test_every_command_in_the_docs_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shown command is parsed by the CLI's own parser (a missing FILE or question is
    fine: a page may name a command without its arguments); every command is shown somewhere."""
    monkeypatch.setattr(argparse.ArgumentParser, "error", _refuse)
    monkeypatch.setattr(argparse.ArgumentParser, "exit", _exit)
    commands = shown_commands()
    wrong = []
    for where, args in commands:
        try:
            cli.build_parser().parse_args(args)
        except Refused as exc:
            if not str(exc).startswith("the following arguments are required"):
                wrong.append(f"{where}: `edgeagent {shlex.join(args)}`: {exc}")
        except SystemExit:  # --help, --version
            pass
    assert not wrong, "commands the CLI does not have:\n" + "\n".join(wrong)
    shown = {args[0] for _, args in commands if args}
    missing = set(subcommands(cli.build_parser())) - shown
    assert not missing, f"commands no document shows as `edgeagent <command>`: {sorted(missing)}"


# --- the example config -----------------------------------------------------------------------


def test_example_config_shows_every_key_and_no_other() -> None:
    """Set or commented out (`# key = value` under its table), every key of config.py is in
    edgeagent.example.toml, and nothing there looks like a key that config.py lacks."""
    shown: dict[str, int] = {}
    table = ""
    for number, line in enumerate(EXAMPLE.read_text().splitlines(), 1):
        header = re.match(r"^\[([a-z_.]+)\]", line)
        if header:
            table = header.group(1) + "."
            continue
        key = re.match(r"^#?\s*([a-z_0-9]+)\s*=", line)
        if key:
            shown[table + key.group(1)] = number
    known = {key for key, _, _ in config.describe_keys()}
    missing = sorted(known - set(shown))
    assert not missing, f"{rel(EXAMPLE)}: keys neither set nor shown commented: {missing}"
    stale = [f"{rel(EXAMPLE)}:{n}: {key}" for key, n in shown.items() if key not in known]
    assert not stale, "keys config.py does not have:\n" + "\n".join(stale)


# --- the protocol -----------------------------------------------------------------------------

PROTOCOL_MD = ROOT / "docs" / "protocol.md"


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the body rows of the first table after `heading` in a markdown text."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows or line.startswith("#"):
            break
    assert len(rows) > 2, f"{rel(PROTOCOL_MD)}: no table after {heading!r}"
    return rows[2:]  # without the header and the |---| line


def code_events() -> set[str]:
    """Every event name edgeagent sends to its clients, from the code ("event": "name").
    cloud_worker.py's events go to the edge on the cloud broker (escalation.md documents them)."""
    names: set[str] = set()
    for module in (ROOT / "edgeagent").glob("*.py"):
        if module.name != "cloud_worker.py":
            names |= set(re.findall(r'"event":\s*"(\w+)"', module.read_text()))
    return names


def code_finish_reasons() -> set[str]:
    names: set[str] = set()
    for module in (ROOT / "edgeagent").glob("*.py"):
        if module.name != "cloud_worker.py":  # the cloud model's reasons are its own
            text = module.read_text()
            names |= set(re.findall(r'"finish_reason":\s*"(\w+)"', text))
            names |= set(re.findall(r'finish_reason="(\w+)"', text))  # protocol.done_event(...)
            names |= set(re.findall(r'self\._finish\(\w+, "(\w+)"\)', text))
    return names


def test_protocol_md_error_codes_are_the_codes() -> None:
    rows = table_after(PROTOCOL_MD.read_text(), "### Error codes")
    documented = [row[0].strip("`") for row in rows]
    missing = set(protocol.ERROR_CODES) - set(documented)
    assert not missing, (
        f"{rel(PROTOCOL_MD)}: error codes of protocol.py not in its table: {missing}"
    )
    unknown = set(documented) - set(protocol.ERROR_CODES)
    assert not unknown, f"{rel(PROTOCOL_MD)}: error codes protocol.py does not have: {unknown}"


def test_protocol_md_ops_are_the_ops() -> None:
    text = PROTOCOL_MD.read_text()
    rows = table_after(text, "## Control operations")
    ops = {m.group(1) for row in rows for m in re.finditer(r'"op": "(\w+)"', row[0])}
    assert ops == set(protocol.OPS), (
        f"{rel(PROTOCOL_MD)}: its ops table has {sorted(ops)}, protocol.OPS {sorted(protocol.OPS)}"
    )
    mqtt_md = (ROOT / "docs" / "mqtt.md").read_text()
    missing = sorted(op for op in protocol.OPS if f'`{{"op": "{op}"' not in mqtt_md)
    assert not missing, f"docs/mqtt.md: ops not listed for the ask topic: {missing}"


def test_protocol_md_events_are_the_events() -> None:
    text = PROTOCOL_MD.read_text()
    sent = code_events()
    assert sent >= CLIENT_EVENTS, f"the scan of edgeagent/ missed events: {CLIENT_EVENTS - sent}"
    events = table_after(text, "## Events")
    in_table = {row[0].strip("`") for row in events}
    ops = table_after(text, "## Control operations")
    replies = {name for row in ops for name in re.findall(r'"event": "(\w+)"', row[1])}
    missing = sorted(sent - in_table - replies)
    assert not missing, f"{rel(PROTOCOL_MD)}: events the code sends but no table shows: {missing}"
    unknown = sorted((in_table | replies) - sent)
    assert not unknown, f"{rel(PROTOCOL_MD)}: events the code never sends: {unknown}"


def test_protocol_md_names_every_finish_reason() -> None:
    reasons = code_finish_reasons()
    assert reasons >= FINISH_REASONS, f"the scan of edgeagent/ missed: {FINISH_REASONS - reasons}"
    events = table_after(PROTOCOL_MD.read_text(), "## Events")
    done = next(row for row in events if row[0] == "`done`")
    missing = sorted(r for r in reasons if f"`{r}`" not in done[1])
    assert not missing, f"{rel(PROTOCOL_MD)}: the done event's finish_reason omits {missing}"


def test_readme_names_every_system_package_the_two_commands_need() -> None:
    readme = (ROOT / "README.md").read_text()
    apt_line = re.search(r"^sudo apt-get install ([^#\n]+)", readme, re.M)
    assert apt_line, "README's two commands start with the packages a newcomer installs"
    # scripts/fresh_box.py times the two commands on a box with exactly these.
    assert tuple(apt_line.group(1).split()) == README_PACKAGES
    # And whatever make installs by itself is said in README.
    makefile = (ROOT / "Makefile").read_text()
    installed = set(re.findall(r'missing="\$\$missing ([a-z0-9.+-]+)"', makefile))
    assert {"python3-venv", "mosquitto", "mmdebstrap"} <= installed, installed
    assert not sorted(p for p in installed if f"`{p}" not in readme and f" {p}" not in readme)
