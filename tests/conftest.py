"""Shared fixtures: real fragment servers and a real composer, all on 127.0.0.1.

`fragments` starts one aiohttp app whose routes the test declares; `start_composer` writes
a routes.yaml and templates into tmp_path and starts a `ComposerServer` on free ports.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from composer.reload import aload
from composer.server import ComposerServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def refused_origin() -> str:
    """A loopback origin nobody listens on: its port stays bound, never listening, until the
    tests end (a port bound and closed again could be taken by another process's server, a
    benchmark's say, before the test connects)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    atexit.register(s.close)
    return f"http://127.0.0.1:{s.getsockname()[1]}"


def free_port() -> int:
    """A loopback port nobody listens on right now (for subprocesses that bind their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Records(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured(name: str) -> Iterator[Records]:
    """Records logged on logger `name` while the block runs (whatever propagation is set up)."""
    logger = logging.getLogger(name)
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, deadline: float = 15.0) -> Any:
    """Await `probe()` every 50 ms until it returns something truthy; fail after `deadline` s."""
    end = time.monotonic() + deadline
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.05)


async def stays(probe: Callable[[], Awaitable[Any]], what: str, seconds: float = 1.5) -> None:
    """`probe()` must stay truthy for `seconds` (checked every 100 ms)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = await probe()
        assert value, f"{what} stopped holding (got {value!r})"
        await asyncio.sleep(0.1)


def children(pid: int) -> set[int]:
    """PIDs of the live processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def rss_kb(pid: int) -> int:
    """The process's resident memory now, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def replace_file(path: Path, text: str) -> None:
    """Put `text` at `path` atomically (rename, as editors and ConfigMap updates do).

    The new file has a new inode and an mtime strictly later than the old one's, so its
    stamp differs even where mtimes are coarse and the size happens to be the same.
    """
    before = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    mtime = max(tmp.stat().st_mtime_ns, before + 1_000_000)
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, path)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every non-empty stderr line, each of which must be a JSON object."""
    records = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a composer subprocess: ours, without an inherited COMPOSER_MANIFEST."""
    env = {k: v for k, v in os.environ.items() if k != "COMPOSER_MANIFEST"}
    env.update(extra)
    return env


class Serve:
    """`python -m composer serve --config routes.yaml` in `cwd`, on free loopback ports.

    stdout is piped (the ready line), stderr goes to a file (JSON log lines). Leaving the
    block sends SIGTERM, then kills the process, and any gunicorn worker recorded in
    `seen_workers`, if it does not exit.
    """

    def __init__(self, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.cwd, self.extra, self.env = cwd, extra, env or cli_env()
        self.port, self.admin_port = free_port(), free_port()
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.seen_workers: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def __aenter__(self) -> Self:
        with open(self.stderr_path, "wb") as err:  # handed to the child, closed once it has it
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "composer", "serve", "--config", "routes.yaml", "--host", "127.0.0.1",
                "--port", str(self.port), "--admin-port", str(self.admin_port), *self.extra,
                cwd=self.cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=err)
        try:
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
            assert b"composer serving" in line, f"no ready line (got {line!r}); stderr:\n{self.stderr()}"
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(self.proc.communicate(), 15)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.communicate()
            for pid in self.seen_workers:  # gunicorn workers orphaned by a killed arbiter
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def alive(self) -> bool:
        assert self.proc is not None
        return self.proc.returncode is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def records(self) -> list[dict[str, Any]]:
        return json_lines(self.stderr())

    def reload_problems(self) -> list[str]:
        """The `problem` of each error line the reloader logged."""
        return [r["problem"] for r in self.records()
                if r.get("logger") == "composer.reload" and r.get("level") == "error" and "problem" in r]

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as session, \
                session.get(self.admin + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200
            return await resp.text()


@dataclass
class FragmentServer:
    """A running fragment service; `url(path)` is an absolute URL on it."""

    server: TestServer
    hits: dict[str, int]
    requests: list[web.Request]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def fragments(aiohttp_server) -> Callable[[dict[str, Handler]], Awaitable[FragmentServer]]:
    """Factory: `await fragments({"/a": handler, ...})` → a running FragmentServer."""

    async def start(routes: dict[str, Handler]) -> FragmentServer:
        hits: dict[str, int] = {}
        seen: list[web.Request] = []

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            hits[request.path] = hits.get(request.path, 0) + 1
            seen.append(request)
            return await handler(request)

        app = web.Application(middlewares=[count])
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        server = await aiohttp_server(app, host="127.0.0.1")
        return FragmentServer(server=server, hits=hits, requests=seen)

    return start


def html(body: str, status: int = 200, headers: dict[str, str] | None = None,
         delay: float = 0.0) -> Handler:
    """A fragment handler answering `body` (after `delay` seconds)."""
    import asyncio

    async def handler(_: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)

    return handler


@dataclass
class Composer:
    """A running composer under test."""

    server: ComposerServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin_url(self) -> str:
        return self.server.admin_url

    async def get(self, path: str, **kwargs) -> tuple[aiohttp.ClientResponse, str]:
        async with self.session.get(self.url + path, allow_redirects=False, **kwargs) as resp:
            return resp, await resp.text()

    async def metrics(self) -> str:
        async with self.session.get(self.admin_url + "/metrics") as resp:
            return await resp.text()


def write_config(tmp_path: Path, templates: dict[str, str], routes: str | None = None,
                 settings: str = "") -> Path:
    """Write templates and a routes.yaml; default: one route `page` at /page → page.html."""
    (tmp_path / "templates").mkdir(exist_ok=True)
    for name, text in templates.items():
        (tmp_path / "templates" / name).write_text(textwrap.dedent(text), encoding="utf-8")
    if routes is None:
        routes = """
            routes:
              - name: page
                match: {path: /page}
                template: page.html
        """
    config = tmp_path / "routes.yaml"
    config.write_text(textwrap.dedent(settings) + textwrap.dedent(routes), encoding="utf-8")
    return config


@pytest.fixture
async def start_composer(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Composer]]]:
    """Factory: `await start_composer({"page.html": "..."}, routes=..., settings=...)`, loaded as
    the reloader loads (`aload`: files read in a thread, a URL manifest fetched in this loop).

    `folder`: a subfolder of tmp_path of its own (default: tmp_path itself); `files`: more
    files written beside routes.yaml first; `manifest`: as `--manifest`; `cookies=False`: the
    test client keeps no cookies (each request says its own `composer_bucket`).
    """
    started: list[Composer] = []

    async def start(templates: dict[str, str], routes: str | None = None, settings: str = "",
                    grace: float = 10.0, *, folder: str | None = None, files: dict[str, str] | None = None,
                    manifest: str | None = None, cookies: bool = True) -> Composer:
        where = tmp_path / folder if folder else tmp_path
        where.mkdir(exist_ok=True)
        for name, text in (files or {}).items():
            (where / name).write_text(text, encoding="utf-8")
        table = await aload(write_config(where, templates, routes, settings), manifest)
        server = ComposerServer(table, host="127.0.0.1", port=0, admin_port=0, grace=grace)
        await server.start()
        jar = None if cookies else aiohttp.DummyCookieJar()
        composer = Composer(server=server, session=aiohttp.ClientSession(cookie_jar=jar))
        started.append(composer)
        return composer

    yield start
    for composer in started:
        await composer.session.close()
        await composer.server.stop()


@pytest.fixture
async def raw_origin() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Factory: a plain TCP server on 127.0.0.1 running `handler` per connection → its origin.

    Teardown closes every connection and cancels every handler still running (hangs included).
    """
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task] = set()
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: RawHandler) -> str:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for writer in writers:
        writer.close()  # a handler waiting to read sees EOF and returns
    if tasks:
        await asyncio.wait(list(tasks), timeout=2)
    for task in list(tasks):  # only a handler stuck elsewhere (3.11 logs these cancellations)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        await server.wait_closed()
