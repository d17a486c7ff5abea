"""The `composer` command: serve, check, demo (SPEC §1); manifest smoke|promote|rollback (SPEC §8).

Exit status: 0 on success (and after a graceful SIGTERM/SIGINT), 2 when the configuration
is invalid — each problem printed as `file:line: message` on stderr, nothing started.
`manifest smoke` exits 1 when it finds a problem; `promote` and `rollback` exit 2 when they
refuse, leaving the file untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine

from . import __version__
from .errors import ConfigError
from .listener import raise_open_files
from .logs import setup_logging
from .routing import RouteTable, load
from .server import ComposerServer, stop_event, tune_gc, tune_malloc

__all__ = ["main"]

log = logging.getLogger("composer")


def _parser() -> argparse.ArgumentParser:
    """The command line of SPEC §1."""
    parser = argparse.ArgumentParser(prog="composer", description="Compose pages from fragments.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the routes in --config")
    serve.add_argument("--config", default="routes.yaml", help="routes file (default ./routes.yaml)")
    serve.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8080, help="page port (default 8080)")
    serve.add_argument("--admin-port", type=int, default=9911, help="admin port (default 9911)")
    serve.add_argument("--admin-host", default="127.0.0.1",
                       help="admin listen address (default 127.0.0.1: metrics and /manifest stay "
                            "on the machine; 0.0.0.0 for a Prometheus or kubelet elsewhere)")
    serve.add_argument("--workers", type=_positive, default=1,
                       help="processes serving pages (default 1; more run under gunicorn)")
    check = commands.add_parser("check", help="validate the config and its templates")
    check.add_argument("--config", default="routes.yaml", help="routes file (default ./routes.yaml)")
    for command in (serve, check):
        command.add_argument("--manifest", default=os.environ.get("COMPOSER_MANIFEST") or None,
                             help="fragment manifest: a YAML/JSON file or an http(s) URL (default "
                                  "$COMPOSER_MANIFEST, else settings.manifest)")
    demo = commands.add_parser("demo", help="serve the bundled example with demo fragment services")
    demo.add_argument("--port", type=int, default=8080, help="page port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9911, help="admin port (default 9911)")
    demo.add_argument("--fragments-port", type=int, default=0,
                      help="port of the demo fragment services (default 0: any free port)")
    _manifest_parser(commands)
    return parser


def _manifest_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`composer manifest smoke|promote|rollback` (SPEC §8)."""
    group = commands.add_parser("manifest", help="release a fragment: smoke-test, promote, roll back")
    actions = group.add_subparsers(dest="action", required=True)
    smoke = actions.add_parser("smoke", help="check every active and canary version, and the pages, "
                                             "before any user sees them; exit 1 on a problem")
    smoke.add_argument("--config", default="routes.yaml", help="routes file (default ./routes.yaml)")
    smoke.add_argument("--path", action="append", default=[], help="a page path to compose too (repeatable)")
    smoke.add_argument("--json", action="store_true", help="a JSON report on stdout")
    promote = actions.add_parser("promote", help="VERSION becomes the canary at --percent, else active")
    promote.add_argument("fragment")
    promote.add_argument("version")
    promote.add_argument("--percent", type=_percent, default=None, help="canary share, 0-100")
    rollback = actions.add_parser("rollback", help="the fragment's rollback version becomes active")
    rollback.add_argument("fragment")
    for action in (smoke, promote, rollback):
        action.add_argument("--manifest", required=True, help="the manifest file (YAML or JSON)")


class _Version(argparse.Action):
    """`composer --version`: one line, enough to tell this `composer` from PHP's Composer and
    MosaicML's, which own the same command name on many machines (argparse's own action
    would re-wrap it to the terminal's width)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"composer {__version__} (fragment-composer, the edge proxy composing pages from fragments)")
        parser.exit()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 to 100, not {value}")
    return value


def _manifest(args: argparse.Namespace) -> int:
    """`composer manifest ...`: 0 done (smoke: no problem), 1 smoke found problems, 2 refused."""
    from . import release

    try:
        if args.action == "promote":
            print(release.promote(args.manifest, args.fragment, args.version, args.percent))
        elif args.action == "rollback":
            print(release.rollback(args.manifest, args.fragment))
        else:
            logging.getLogger("composer").addHandler(logging.NullHandler())  # its problems are the output
            problems, checked = release.smoke(args.config, args.manifest, args.path)
            if args.json:
                print(json.dumps({"ok": not problems, "checked": checked,
                                  "problems": [dataclasses.asdict(p) | {"line": str(p)} for p in problems]},
                                 indent=2))
            else:
                for found in problems:
                    print(found)
                if not problems:
                    print(f"{args.manifest}: ok ({checked['versions']} versions, {checked['pages']} pages)")
            return 1 if problems else 0
    except (release.Refused, ConfigError) as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "manifest":
        return _manifest(args)
    try:
        if args.command == "check":
            table = load(args.config, args.manifest)  # no event loop yet: a URL manifest is fetched here
            for warning in table.warnings:
                print(warning, file=sys.stderr)
            fragments = sum(len(t.fragments) for _, t in table.templates())
            print(f"{table.label}: ok ({len(table.routes)} routes, {fragments} fragments)")
            for line in _layout_lines(table):
                print(line)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            setup_logging()
            return _run(run_demo(port=args.port, admin_port=args.admin_port, fragments_port=args.fragments_port))
        table = load(args.config, args.manifest)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging()
    raise_open_files(table.settings.max_connections)
    for warning in table.warnings:
        log.warning("config warning", extra={"fields": {"problem": warning}})
    if args.workers > 1:
        from .workers import serve_workers

        return serve_workers(table, host=args.host, port=args.port, admin_host=args.admin_host,
                             admin_port=args.admin_port, workers=args.workers)
    server = ComposerServer(table, host=args.host, port=args.port, admin_host=args.admin_host,
                            admin_port=args.admin_port)
    return _run(_serve(server))


def _layout_lines(table: RouteTable) -> list[str]:
    """`layout base.html: home, product`, one line per layout: which pages a layout edit changes."""
    users: dict[str, list[str]] = {}
    for route in table.routes:
        if route.layout is not None:
            users.setdefault(route.layout, []).append(route.name)
    return [f"layout {layout}: {', '.join(names)}" for layout, names in users.items()]


async def _serve(server: ComposerServer) -> int:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP reloads."""
    stop = stop_event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reloader.trigger)
    try:
        await server.start()
    except OSError as exc:
        print(f"composer: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        await server.stop()
        return 1
    print(f"composer serving {server.url} (admin {server.admin_url})", flush=True)
    tune_gc()
    tune_malloc()
    await stop.wait()
    log.info("stopping: draining in-flight pages", extra={"fields": {"grace_s": server.grace}})
    await server.stop()
    log.info("stopped")
    return 0


def _run(coro: Coroutine[object, object, int]) -> int:
    """Run `coro` on uvloop when it is installed (faster), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
