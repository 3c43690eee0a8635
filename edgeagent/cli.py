"""The `edgeagent` command: run the daemon, check config, manage models, ask from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from edgeagent import __version__, config, models
from edgeagent.client import Client, ClientError, default_socket_path


def _cmd_run(args: argparse.Namespace) -> int:
    from edgeagent import daemon  # noqa: PLC0415 (keeps client commands light)

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return daemon.EXIT_CONFIG
    return daemon.run(cfg)


def _cmd_cloud_worker(args: argparse.Namespace) -> int:
    from edgeagent import daemon  # noqa: PLC0415
    from edgeagent.cloud_worker import CloudWorker  # noqa: PLC0415
    from edgeagent.mqtt_client import SecretError  # noqa: PLC0415

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return daemon.EXIT_CONFIG
    daemon.setup_logging(cfg.log.level)
    try:
        worker = CloudWorker(cfg)
    except SecretError as exc:
        print(f"{cfg.source}: {exc}", file=sys.stderr)
        return daemon.EXIT_CONFIG
    return worker.run()


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.file)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"{cfg.source}: ok (node_id {cfg.node_id})")
    return 0


def _cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, doc in config.describe_keys():
        shown = f"0o{default:o}" if key.endswith(".mode") else json.dumps(default)
        print(f"{key} = {shown}" + (f"    # {doc}" if doc else ""))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    try:
        manifest = models.load_manifest()
        if args.action == "list":
            for spec in manifest.models.values():
                info = models.describe(spec)
                mark = "*" if spec.name == manifest.default else " "
                state = "cached" if info["cached"] else "not fetched"
                print(f"{mark} {spec.name:40} {state:12} {spec.description}")
                print(f"  {'':40} {info['file']}")
            return 0
        if args.action == "verify" and args.path:
            sha = models.verify(Path(args.path), None, args.sha256, force=True)
            print(f"{args.path}: sha256 {sha}")
            return 0
        spec = manifest.get(args.name or manifest.default)
        if args.action == "fetch":
            path = models.fetch(spec, force=args.force)
            print(path)
            return 0
        path = models.model_path(spec)
        bar = models.Progress(f"verifying {spec.name}", path.stat().st_size if path.exists() else 0)
        sha = models.verify(path, spec.size, spec.sha256, force=True, progress=bar)
        print(f"{path}: ok (sha256 {sha})")
        return 0
    except models.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def _request(args: argparse.Namespace, text: str, session: Optional[str]) -> dict[str, Any]:
    req: dict[str, Any] = {"messages": []}
    if args.system:
        req["messages"].append({"role": "system", "content": args.system})
    req["messages"].append({"role": "user", "content": text})
    if session:
        req["session"] = session
    if args.max_tokens is not None:
        req["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        req["temperature"] = args.temperature
    if getattr(args, "kb", False):
        req["kb"] = True
    return req


def _stream_answer(client: Client, req: dict[str, Any], as_json: bool) -> int:
    rid = client.new_id()
    req["id"] = rid
    client.send(req)
    cancelled = False
    events = client.events(rid)
    while True:
        try:
            event = next(events)
        except StopIteration:
            return 1
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            client.send({"op": "cancel", "id": rid})
            continue
        if as_json:
            print(json.dumps(event), flush=True)
        elif event["event"] == "token":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif event["event"] == "citations":  # the manual's words, before the answer
            for cite in event["citations"]:
                page = f", page {cite['page']}" if cite.get("page") else ""
                print(f"[{cite['n']}] {cite['doc']} - {cite['section']}{page}", file=sys.stderr)
        elif event["event"] == "restart":  # what was printed is void; the answer starts again
            sys.stdout.write(f"\n[{event.get('reason', 'the answer starts again')}]\n")
        elif event["event"] == "done":
            if not req.get("stream", True):
                sys.stdout.write(event["text"])
            sys.stdout.write("\n")
        elif event["event"] == "error":
            sys.stdout.write("\n")
            print(f"error: {event['code']}: {event['message']}", file=sys.stderr)
        if event["event"] in ("done", "error"):
            return 0 if event["event"] == "done" else 1


def _cmd_ask(args: argparse.Namespace) -> int:
    question = " ".join(args.question) if args.question else sys.stdin.read().strip()
    if not question:
        print("error: nothing to ask", file=sys.stderr)
        return 2
    try:
        with Client(args.socket) as client:
            req = _request(args, question, args.session)
            if args.no_stream:
                req["stream"] = False
            return _stream_answer(client, req, args.json)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_chat(args: argparse.Namespace) -> int:
    session = args.session or f"chat-{uuid.uuid4().hex[:12]}"
    try:
        with Client(args.socket) as client:
            print(f"edgeagent chat (session {session}); /reset forgets, /quit or Ctrl-D leaves")
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    print()
                    return 0
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    return 0
                if line == "/reset":
                    client.op("reset", session=session)
                    print("(conversation forgotten)")
                    continue
                sys.stdout.write("edgeagent> ")
                _stream_answer(client, _request(args, line, session), as_json=False)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 130


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, timeout=10) as client:
            print(json.dumps(client.op("status"), indent=2))
            return 0
    except (ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


INSTALLED_CONFIG = Path("/etc/edgeagent/edgeagent.toml")  # scripts/install.sh's layout
INSTALLED_STATE = Path("/var/lib/edgeagent")


def _cmd_kb(args: argparse.Namespace) -> int:
    from edgeagent import kb  # noqa: PLC0415

    # Beside an installed service, its config and its state directory, where the service
    # (StateDirectory=edgeagent) looks: `sudo -u edgeagent edgeagent kb add ...` has no
    # $STATE_DIRECTORY of its own.
    installed = args.config is None and INSTALLED_CONFIG.exists()
    try:
        cfg = config.load(str(INSTALLED_CONFIG) if installed else args.config)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    default = (
        INSTALLED_STATE / "kb.sqlite"
        if installed and not os.environ.get("STATE_DIRECTORY")
        else kb.default_kb_path()
    )
    path = Path(args.db or cfg.kb.path or default)
    if args.action != "add" and not path.exists():
        print(f"{path}: no knowledge base yet (edgeagent kb add FILE...)", file=sys.stderr)
        return 1
    embedder = None
    if cfg.kb.embedding_model and args.action in ("add", "reindex", "search"):
        embedder = kb.Embedder(Path(cfg.kb.embedding_model), os.cpu_count() or 1)
    base = kb.KnowledgeBase(path, embedder=embedder)
    try:
        if args.action == "add":
            if not args.paths:
                print("kb add: give one or more files", file=sys.stderr)
                return 2
            failed = 0
            collection = args.collection or "default"
            for name in args.paths:
                try:
                    title, n, changed = base.add(Path(name), collection,
                                                 cfg.kb.passage_tokens)  # fmt: skip
                except kb.KbError as exc:
                    print(f"{name}: {exc}", file=sys.stderr)
                    failed += 1
                    continue
                what = f"{n} passages" if changed else f"unchanged, {n} passages"
                print(f"{name}: {title!r} in {collection}: {what}")
            return 1 if failed else 0
        if args.action == "list":
            for d in base.documents():
                print(f"{d['collection']:12} {d['passages']:5} passages  {d['title']}  "
                      f"({d['path']})")  # fmt: skip
            stats = base.stats()
            print(f"{stats['documents']} documents, {stats['passages']} passages in {path}")
            return 0
        if args.action == "remove":
            gone = sum(base.remove(name, args.collection) for name in args.paths)
            print(f"removed {gone} document(s)")
            return 0 if gone else 1
        if args.action == "search":
            query = " ".join(args.paths)
            vector = None
            if embedder is not None and base.embedding() is not None:
                if base.embedding() == embedder.fingerprint:
                    vector = embedder.embed(query, kb.QUESTION_TOKENS)
                else:
                    print("the passages' vectors come from another model: searching by the "
                          "words alone (edgeagent kb reindex)", file=sys.stderr)  # fmt: skip
            for i, hit in enumerate(base.search(query, args.k, vector=vector), start=1):
                page = f", page {hit.page}" if hit.page else ""
                print(f"[{i}] {hit.doc}: {hit.section}{page} (score {hit.score:.4f}, "
                      f"matched {hit.matched:.2f})")  # fmt: skip
                print("    " + hit.text.replace("\n", "\n    "))
            return 0
        problems = base.reindex(cfg.kb.passage_tokens)
        for name, problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
        print(f"reindexed: {base.stats()['passages']} passages")
        return 1 if problems else 0
    finally:
        base.close()
        if embedder is not None:
            embedder.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeagent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML config file (default: the embedded default config)")
    run.set_defaults(func=_cmd_run)

    worker = sub.add_parser(
        "cloud-worker", help="answer escalations with an OpenAI-compatible server (vLLM, TGI)"
    )
    worker.add_argument("--config", required=True, help="TOML config with [cloud] and [worker]")
    worker.set_defaults(func=_cmd_cloud_worker)

    cfg = sub.add_parser("config", help="check a config file or list every key")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    check = cfg_sub.add_parser("check", help="validate FILE; exit 2 listing every problem")
    check.add_argument("file")
    check.set_defaults(func=_cmd_config_check)
    keys = cfg_sub.add_parser("keys", help="every key with its default")
    keys.set_defaults(func=_cmd_config_keys)

    model = sub.add_parser("model", help="list, fetch or verify models")
    model.add_argument("action", choices=("list", "fetch", "verify"))
    model.add_argument(
        "name", nargs="?", help="model name from the manifest (default: its default)"
    )
    model.add_argument("--force", action="store_true", help="fetch even if a verified copy exists")
    model.add_argument("--path", help="verify: check this file instead of a manifest model")
    model.add_argument("--sha256", help="verify --path: the expected sha256")
    model.set_defaults(func=_cmd_model)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", default=None, help=f"default: {default_socket_path()}")
        sp.add_argument("--session", help="conversation name for follow-ups")
        sp.add_argument("--system", help="system message")
        sp.add_argument("--max-tokens", type=int)
        sp.add_argument("--temperature", type=float)

    ask = sub.add_parser("ask", help="ask one question; the answer streams to stdout")
    ask.add_argument("question", nargs="*", help="the question (default: read stdin)")
    client_args(ask)
    ask.add_argument("--json", action="store_true", help="print every event as a JSON line")
    ask.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    ask.add_argument("--kb", action="store_true", help="answer from the manuals, cited")
    ask.set_defaults(func=_cmd_ask)

    chat = sub.add_parser("chat", help="interactive multi-turn conversation")
    client_args(chat)
    chat.set_defaults(func=_cmd_chat)

    kbp = sub.add_parser("kb", help="the knowledge base: add, list, remove, search, reindex")
    kbp.add_argument("action", choices=("add", "list", "remove", "search", "reindex"))
    kbp.add_argument("paths", nargs="*", help="files (add), documents (remove), or the query")
    kbp.add_argument(
        "--collection", help='add: into this collection ("default"); remove: only from it'
    )
    kbp.add_argument(
        "--config", help="TOML config for [kb] (default: /etc/edgeagent/edgeagent.toml if present)"
    )
    kbp.add_argument("--db", help="the knowledge base file (default: [kb] path)")
    kbp.add_argument("-k", type=int, default=4, help="search: passages to show")
    kbp.set_defaults(func=_cmd_kb)

    status = sub.add_parser("status", help="print the daemon's status")
    status.add_argument("--socket", default=None)
    status.set_defaults(func=_cmd_status)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left must surface in this try
    except BrokenPipeError:
        # The reader left early (`edgeagent config keys | head`). Python ignores SIGPIPE, so
        # this is where a Unix tool would have been killed by it: end quietly with the status a
        # shell reports for that (141), so `set -o pipefail` scripts see the output was cut.
        # The flush at exit then writes what is left to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return rc


if __name__ == "__main__":
    sys.exit(main())
