"""Hot reload (SPEC §2, §4): routes.yaml, templates and settings change without a restart.

Everything is real: `python -m composer serve` subprocesses (one process, or gunicorn with
`--workers 2`) or an in-process `ComposerServer` from `start_composer`, fragment services from
`fragments`, all on 127.0.0.1. Files are replaced atomically with a strictly later mtime, so
their stamp always changes and no poll can catch a half-written file. Reloads are awaited by
polling what a client sees (the `Location` of a redirect route, a composed page) or the
`composer_config_reloads_total` counter, with a generous deadline; never by a fixed sleep.
The only fixed waits are the ones proving something does NOT happen (no re-try of a refused
config, no reload with polling off), each spanning several poll intervals, and one deliberate
block of the event loop that lands a trigger exactly as a poll interval ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import Serve as ServeBase
from conftest import children, eventually, html, replace_file, stays
from prometheus_client.parser import text_string_to_metric_families

from composer.config import file_stamp

POLL_MS = 200  # reload_interval_ms of most configs here, so the tests stay quick


# --------------------------------------------------------------------------- helpers


def routes(home: str, *, interval: int | None = POLL_MS, more: str = "", settings: str = "") -> str:
    """A routes.yaml: `/home` redirects (302) to `home`, `/page` composes page.html.

    `more` (more routes) and `settings` (more settings) are appended as given, indented by two
    spaces like the rest. `interval` None leaves reload_interval_ms at its default (1000).
    """
    head = "settings:\n" if interval is not None or settings else ""
    if interval is not None:
        head += f"  reload_interval_ms: {interval}\n"
    head += settings
    return head + textwrap.dedent(f"""\
        routes:
          - name: home
            match: {{path: /home}}
            redirect: {{to: {home}, status: 302}}
          - name: page
            match: {{path: /page}}
            template: page.html
        """) + more


FRESH_ROUTE = """\
  - name: fresh
    match: {path: /fresh}
    redirect: {to: /fresh-target, status: 302}
"""

# Bad edits of `routes("/v1")`. Each would also move /home to /v2 and add /fresh if it were
# accepted, so the tests can tell that nothing of it went live. The line numbers are real.
BAD_YAML = """\
settings:
  reload_interval_ms: 200
routes:
  - name: home
    match: {path: /home}
      redirect: {to: /v2, status: 302}
  - name: page
    match: {path: /page}
    template: page.html
"""
UNKNOWN_PREDICATE = """\
settings:
  reload_interval_ms: 200
routes:
  - name: home
    match: {path: /home}
    redirect: {to: /v2, status: 302}
  - name: page
    match: {path: /page, tenant: blue}
    template: page.html
"""
MISSING_TEMPLATE = """\
settings:
  reload_interval_ms: 200
routes:
  - name: home
    match: {path: /home}
    redirect: {to: /v2, status: 302}
  - name: page
    match: {path: /page}
    template: page.html
  - name: fresh
    match: {path: /fresh}
    template: fresh.html
"""
TWO_PROBLEMS = """\
settings:
  reload_interval_ms: 200
routes:
  - name: home
    match: {path: /home, tenant: blue}
    redirect: {to: /v2, status: 302}
  - name: page
    match: {path: /page}
    template: page.html
  - name: fresh
    match: {path: /fresh}
    template: fresh.html
"""


def rewrite_keeping_stamp(path: Path, text: str) -> None:
    """Change the content in place (same inode) to `text` of the same size, then put the old
    mtime back: a change no stamp comparison can see, which is what SIGHUP is for."""
    before = path.stat()
    assert len(text.encode()) == before.st_size, "the new text must have the old size"
    stamp = file_stamp(path)
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_stamp(path) == stamp


def reload_counts(metrics_text: str) -> dict[str, float]:
    """`composer_config_reloads_total` by `result`; an absent sample counts as 0."""
    counts = {"ok": 0.0, "error": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "composer_config_reloads_total":
                counts[sample.labels["result"]] = sample.value
    return counts


def requests_total(metrics_text: str, route: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
               if s.name == "composer_requests_total" and s.labels.get("route") == route)


async def fetch(url: str) -> tuple[int, str, str]:
    """GET on a fresh connection (so worker processes share the load): status, Location, body."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            session.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, resp.headers.get("Location", ""), await resp.text()


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[len("socket:["):-1] in inodes:
            return True
    return False


class Serve(ServeBase):
    """A composer subprocess (conftest's), with probes for redirects, reloads and workers."""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.seen_workers |= children(self.proc.pid)  # so none outlives a killed arbiter
        await super().stop()

    async def location(self, path: str = "/home") -> str:
        status, location, _ = await fetch(self.base + path)
        return location if status == 302 else f"<{status}>"

    async def reloads(self) -> dict[str, float]:
        return reload_counts(await self.metrics())

    async def wait_reloads(self, ok: float, error: float) -> None:
        want = {"ok": ok, "error": error}

        async def reached() -> bool:
            return await self.reloads() == want
        await eventually(reached, f"composer_config_reloads_total == {want}")

    async def booted_workers(self, count: int) -> set[int]:
        """Wait until exactly `count` workers run and each listens on the admin port, which a
        worker binds after its catch-up check, once its SIGHUP handler is in place."""
        async def ready() -> set[int] | None:
            assert self.alive(), f"composer exited; stderr:\n{self.stderr()}"
            pids = children(self.pid)
            self.seen_workers |= pids
            if len(pids) == count and all(listens(pid, self.admin_port) for pid in pids):
                return pids
            return None
        return await eventually(ready, f"{count} booted workers")


async def all_redirect_to(serve: Serve, target: str, times: int = 20) -> None:
    """`times` requests, each on a new connection, all see /home → `target`."""
    seen = [await serve.location("/home") for _ in range(times)]
    assert seen == [target] * times


def page_html(fragment_url: str, label: str) -> str:
    return f'<html><body><h1>{label}</h1><fragment src="{fragment_url}"></fragment></body></html>\n'


def problem_of(record: logging.LogRecord) -> str:
    fields = getattr(record, "fields", None)
    assert isinstance(fields, dict) and "problem" in fields, f"record {record.getMessage()!r} has no problem"
    return fields["problem"]


def reload_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [problem_of(r) for r in caplog.records if r.name == "composer.reload" and r.levelno == logging.ERROR]


# --------------------------------------------------------------------------- routes.yaml, one process


async def test_good_routes_edit_applies_in_the_running_process_with_the_default_interval(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1", interval=None), encoding="utf-8")
    async with Serve(tmp_path) as serve:
        pid = serve.pid
        assert await serve.location("/home") == "/v1"
        assert await serve.location("/fresh") == "<404>"
        before = await serve.metrics()
        assert reload_counts(before) == {"ok": 0, "error": 0}
        served_before = requests_total(before, "home")
        assert served_before == 1

        replace_file(tmp_path / "routes.yaml", routes("/v2", interval=None, more=FRESH_ROUTE))

        async def moved() -> bool:
            return await serve.location("/home") == "/v2"
        await eventually(moved, "/home to redirect to /v2 (default reload interval, 1 s)")
        assert await serve.location("/fresh") == "/fresh-target"
        assert (await fetch(serve.base + "/page"))[::2] == (200, "<p>page</p>\n")

        after = await serve.metrics()
        assert reload_counts(after) == {"ok": 1, "error": 0}
        # The same process: still running, and its counters carried on instead of restarting.
        assert serve.alive() and serve.pid == pid
        assert requests_total(after, "home") > served_before
        assert any(r.get("logger") == "composer.reload" and r.get("level") == "info" for r in serve.records())
        assert serve.reload_problems() == []


@pytest.mark.parametrize(("bad", "problems"), [
    (BAD_YAML, ["routes.yaml:6: invalid YAML: "]),
    (UNKNOWN_PREDICATE, ["routes.yaml:8: unknown predicate 'tenant' in match"]),
    (MISSING_TEMPLATE, ["routes.yaml:12: template 'fresh.html' not found"]),
    (TWO_PROBLEMS, ["routes.yaml:5: unknown predicate 'tenant' in match",
                    "routes.yaml:12: template 'fresh.html' not found"]),
], ids=["invalid-yaml", "unknown-predicate", "missing-template", "two-problems"])
async def test_bad_routes_edit_keeps_the_running_config_logs_each_problem_once_then_the_fix_applies(
        tmp_path, bad, problems):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1"), encoding="utf-8")
    async with Serve(tmp_path) as serve:
        assert await serve.location("/home") == "/v1"

        replace_file(tmp_path / "routes.yaml", bad)
        await serve.wait_reloads(ok=0, error=1)

        # Still the previous config, whole: nothing of the bad edit is live.
        assert await serve.location("/home") == "/v1"
        assert await serve.location("/fresh") == "<404>"
        assert (await fetch(serve.base + "/page"))[::2] == (200, "<p>page</p>\n")

        # One JSON error line per problem, naming file:line.
        async def logged() -> list[str]:
            return serve.reload_problems()
        logged_problems = await eventually(logged, "the reload problems on stderr")
        assert len(logged_problems) == len(problems), logged_problems
        for line, prefix in zip(sorted(logged_problems), sorted(problems), strict=True):
            assert line.startswith(prefix), (line, prefix)

        # Nothing changes on disk: no retry, no new log line, over several poll intervals.
        async def unchanged() -> bool:
            return await serve.reloads() == {"ok": 0, "error": 1}
        await stays(unchanged, "the error count staying at 1")
        assert serve.reload_problems() == logged_problems
        assert await serve.location("/home") == "/v1"

        replace_file(tmp_path / "routes.yaml", routes("/v2", more=FRESH_ROUTE))
        await serve.wait_reloads(ok=1, error=1)
        assert await serve.location("/home") == "/v2"
        assert await serve.location("/fresh") == "/fresh-target"
        assert serve.reload_problems() == logged_problems
        assert serve.alive()


async def test_sighup_reloads_at_once_when_polling_is_off_and_the_process_survives(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1", interval=0), encoding="utf-8")
    async with Serve(tmp_path) as serve:
        pid = serve.pid
        assert await serve.location("/home") == "/v1"

        replace_file(tmp_path / "routes.yaml", routes("/v2", interval=0, more=FRESH_ROUTE))

        async def still_old() -> bool:
            return await serve.location("/home") == "/v1"
        await stays(still_old, "/home → /v1 with reload_interval_ms: 0", seconds=2.5)
        assert await serve.reloads() == {"ok": 0, "error": 0}

        os.kill(pid, signal.SIGHUP)

        async def moved() -> bool:
            return await serve.location("/home") == "/v2"
        await eventually(moved, "/home to redirect to /v2 after SIGHUP")
        assert await serve.location("/fresh") == "/fresh-target"
        assert await serve.reloads() == {"ok": 1, "error": 0}
        assert serve.alive() and serve.pid == pid

        # Again, with polling still off: the next edit also waits for the next SIGHUP.
        replace_file(tmp_path / "routes.yaml", routes("/v3", interval=0))

        async def still_v2() -> bool:
            return await serve.location("/home") == "/v2"
        await stays(still_v2, "/home → /v2 until the next SIGHUP")
        os.kill(pid, signal.SIGHUP)

        async def moved_again() -> bool:
            return await serve.location("/home") == "/v3"
        await eventually(moved_again, "/home to redirect to /v3 after the second SIGHUP")
        assert await serve.location("/fresh") == "<404>"
        assert serve.alive()
        assert (await fetch(f"http://127.0.0.1:{serve.admin_port}/healthz"))[0] == 200
        assert serve.reload_problems() == []


# --------------------------------------------------------------------------- templates


async def test_template_edit_alone_applies(start_composer, fragments, tmp_path):
    svc = await fragments({"/a": html("<p>fragment A</p>"), "/b": html("<p>fragment B</p>")})
    composer = await start_composer({"page.html": page_html(svc.url("/a"), "first")},
                                    settings=f"settings: {{reload_interval_ms: {POLL_MS}}}\n")
    routes_stamp = file_stamp(tmp_path / "routes.yaml")
    resp, body = await composer.get("/page")
    assert (resp.status, body) == (200, "<html><body><h1>first</h1><p>fragment A</p></body></html>\n")

    replace_file(tmp_path / "templates" / "page.html", page_html(svc.url("/b"), "second"))

    async def recomposed() -> bool:
        resp, body = await composer.get("/page")
        return resp.status == 200 and body == "<html><body><h1>second</h1><p>fragment B</p></body></html>\n"
    await eventually(recomposed, "the edited template to be served")
    assert file_stamp(tmp_path / "routes.yaml") == routes_stamp, "routes.yaml must not have been touched"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}


async def test_broken_template_keeps_the_old_one_until_the_template_is_fixed(start_composer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="composer.reload")
    composer = await start_composer({"page.html": "<p>good v1</p>\n"},
                                    settings=f"settings: {{reload_interval_ms: {POLL_MS}}}\n")
    template = tmp_path / "templates" / "page.html"
    replace_file(template, '<p>broken</p>\n<fragment src="ftp://a.svc/x"></fragment>\n')

    async def refused() -> bool:
        return reload_counts(await composer.metrics())["error"] == 1
    await eventually(refused, "the broken template to be refused")
    resp, body = await composer.get("/page")
    assert (resp.status, body) == (200, "<p>good v1</p>\n")
    errors = reload_errors(caplog)
    assert len(errors) == 1 and errors[0].startswith(f"{template}:2:"), errors

    async def not_retried() -> bool:
        return reload_counts(await composer.metrics()) == {"ok": 0, "error": 1}
    await stays(not_retried, "no retry while the broken template is unchanged")
    assert len(reload_errors(caplog)) == 1

    replace_file(template, "<p>good v2</p>\n")

    async def fixed() -> bool:
        _, body = await composer.get("/page")
        return body == "<p>good v2</p>\n"
    await eventually(fixed, "the fixed template to be served")
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 1}


async def test_creating_the_missing_template_retries_the_refused_config(start_composer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="composer.reload")
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1"))
    config = tmp_path / "routes.yaml"
    replace_file(config, routes("/v2", more=(
        "  - name: fresh\n"
        "    match: {path: /fresh}\n"
        "    template: fresh.html\n")))

    async def refused() -> bool:
        return reload_counts(await composer.metrics())["error"] == 1
    await eventually(refused, "the config naming a missing template to be refused")
    errors = reload_errors(caplog)
    assert len(errors) == 1 and errors[0].startswith(f"{config}:12: template 'fresh.html' not found"), errors
    resp, _ = await composer.get("/home")
    assert resp.headers["Location"] == "/v1"
    assert (await composer.get("/fresh"))[0].status == 404

    async def not_retried() -> bool:
        return reload_counts(await composer.metrics()) == {"ok": 0, "error": 1}
    await stays(not_retried, "no retry before the template exists")
    config_stamp = file_stamp(config)

    replace_file(tmp_path / "templates" / "fresh.html", "<p>fresh page</p>\n")

    async def served() -> bool:
        resp, body = await composer.get("/fresh")
        return resp.status == 200 and body == "<p>fresh page</p>\n"
    await eventually(served, "/fresh to be served once its template exists")
    assert (await composer.get("/home"))[0].headers["Location"] == "/v2"
    assert file_stamp(config) == config_stamp, "routes.yaml must not have been touched"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 1}
    assert len(reload_errors(caplog)) == 1


async def test_page_in_flight_finishes_with_the_template_it_started_with(start_composer, fragments, tmp_path):
    release = asyncio.Event()

    async def held(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="<p>slow fragment</p>", content_type="text/html")

    svc = await fragments({"/slow": held})
    composer = await start_composer({"page.html": page_html(svc.url("/slow"), "old layout")},
                                    settings="settings: {reload_interval_ms: 0}\n")
    old_table = composer.server.table
    in_flight = asyncio.create_task(composer.get("/page"))
    later: asyncio.Task | None = None
    try:
        async def requested(n: int) -> bool:
            return svc.hits.get("/slow", 0) >= n

        await eventually(lambda: requested(1), "the first page to request its fragment")
        replace_file(tmp_path / "templates" / "page.html", page_html(svc.url("/slow"), "new layout"))
        assert await composer.server.reloader.check() is True
        assert composer.server.table is not old_table

        later = asyncio.create_task(composer.get("/page"))
        await eventually(lambda: requested(2), "the second page to request its fragment")
        assert not in_flight.done(), "the first page must still be waiting for its fragment"
        release.set()
        (resp_old, body_old), (resp_new, body_new) = await asyncio.wait_for(asyncio.gather(in_flight, later), 10)
    finally:
        release.set()
        for task in (in_flight, later):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(in_flight, *([later] if later else []), return_exceptions=True)
    assert (resp_old.status, body_old) == (
        200, "<html><body><h1>old layout</h1><p>slow fragment</p></body></html>\n")
    assert (resp_new.status, body_new) == (
        200, "<html><body><h1>new layout</h1><p>slow fragment</p></body></html>\n")


# --------------------------------------------------------------------------- settings, check(), trigger()


async def test_settings_change_applies_forward_headers(start_composer, fragments, tmp_path):
    svc = await fragments({"/echo": html("<p>echo</p>")})
    before = """\
        settings:
          reload_interval_ms: 0
          forward_headers: [accept-language]
    """
    composer = await start_composer({"page.html": page_html(svc.url("/echo"), "page")}, settings=before)
    sent = {"accept-language": "fr", "x-team": "blue"}

    resp, _ = await composer.get("/page", headers=sent)
    assert resp.status == 200
    seen = svc.requests[-1].headers
    assert seen.get("accept-language") == "fr" and "x-team" not in seen

    replace_file(tmp_path / "routes.yaml", routes("/v1", interval=0, settings="  forward_headers: [x-team]\n"))
    assert await composer.server.reloader.check() is True
    assert composer.server.table.settings.forward_headers == ("x-team",)

    resp, _ = await composer.get("/page", headers=sent)
    assert resp.status == 200
    seen = svc.requests[-1].headers
    assert seen.get("x-team") == "blue" and "accept-language" not in seen
    assert len(svc.requests) == 2


async def test_check_returns_none_when_unchanged_true_when_applied_false_when_refused(
        start_composer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="composer.reload")
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1", interval=0))
    server, config = composer.server, tmp_path / "routes.yaml"

    async def location() -> str:
        return (await composer.get("/home"))[0].headers["Location"]

    async def counts() -> dict[str, float]:
        return reload_counts(await composer.metrics())

    table = server.table
    assert await server.reloader.check() is None
    assert server.table is table and await counts() == {"ok": 0, "error": 0}

    replace_file(config, routes("/v2", interval=0))
    assert await server.reloader.check() is True
    assert server.table is not table and await location() == "/v2"
    assert await counts() == {"ok": 1, "error": 0}
    table = server.table
    assert await server.reloader.check() is None

    bad = BAD_YAML.replace("reload_interval_ms: 200", "reload_interval_ms: 0")
    replace_file(config, bad)
    assert await server.reloader.check() is False
    assert server.table is table and await location() == "/v2"
    assert await counts() == {"ok": 1, "error": 1}
    assert [p.startswith(f"{config}:6: invalid YAML") for p in reload_errors(caplog)] == [True]

    # Refused and unchanged since: not tried again, not logged again.
    assert await server.reloader.check() is None
    assert await counts() == {"ok": 1, "error": 1} and len(reload_errors(caplog)) == 1

    # The same bad text saved again is a change: tried again, refused again.
    replace_file(config, bad)
    assert await server.reloader.check() is False
    assert await counts() == {"ok": 1, "error": 2} and len(reload_errors(caplog)) == 2

    replace_file(config, routes("/v3", interval=0))
    assert await server.reloader.check() is True
    assert await location() == "/v3"
    assert await counts() == {"ok": 2, "error": 2}
    assert await server.reloader.check() is None


async def test_trigger_forces_a_reload_that_no_stamp_shows(start_composer, tmp_path):
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1"))
    rewrite_keeping_stamp(tmp_path / "routes.yaml", routes("/v2"))

    async def still_old() -> bool:
        return (await composer.get("/home"))[0].headers["Location"] == "/v1"
    await stays(still_old, "/home → /v1 while polling sees no change")

    composer.server.reloader.trigger()  # what SIGHUP does

    async def moved() -> bool:
        return (await composer.get("/home"))[0].headers["Location"] == "/v2"
    await eventually(moved, "the forced reload")
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}


async def test_trigger_landing_as_the_poll_interval_ends_still_forces_the_reload(start_composer, tmp_path):
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1"))
    assert (await composer.get("/home"))[0].headers["Location"] == "/v1"  # the reloader is waiting by now
    rewrite_keeping_stamp(tmp_path / "routes.yaml", routes("/v2"))
    # The reloader waits for a trigger with a POLL_MS timeout. Block the loop past that timeout,
    # then trigger in the very loop iteration whose expired timer ends the wait: the wait ends
    # with a timeout although the trigger was set, and the check must still be forced.
    time.sleep(3 * POLL_MS / 1000)  # noqa: ASYNC251 - blocking the loop is the point here
    await asyncio.sleep(0)
    composer.server.reloader.trigger()

    async def moved() -> bool:
        return (await composer.get("/home"))[0].headers["Location"] == "/v2"
    await eventually(moved, "the reload forced by a trigger that raced the poll timeout")
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}


async def test_deleted_routes_yaml_keeps_serving_until_it_is_back(start_composer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="composer.reload")
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1", interval=0))
    server, config = composer.server, tmp_path / "routes.yaml"

    config.unlink()
    assert await server.reloader.check() is False
    assert (await composer.get("/home"))[0].headers["Location"] == "/v1"
    assert reload_errors(caplog) == [f"{config}:1: file not found"]
    assert await server.reloader.check() is None

    replace_file(config, routes("/v2", interval=0))
    assert await server.reloader.check() is True
    assert (await composer.get("/home"))[0].headers["Location"] == "/v2"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 1}


async def test_configmap_symlink_swap_is_noticed_even_with_the_same_size_and_mtime(start_composer, tmp_path):
    """Kubernetes updates a ConfigMap volume by swapping the `..data` symlink to a new folder."""
    composer = await start_composer({"page.html": "<p>page</p>\n"}, routes=routes("/v1"))
    config = tmp_path / "routes.yaml"
    mtime = config.stat().st_mtime_ns

    def publish(version: str, text: str) -> None:
        folder = tmp_path / f"..{version}"
        folder.mkdir()
        (folder / "routes.yaml").write_text(text, encoding="utf-8")
        os.utime(folder / "routes.yaml", ns=(mtime, mtime))
        (tmp_path / "..data_tmp").symlink_to(folder.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    publish("2024_01", routes("/v1"))
    config.unlink()
    config.symlink_to(Path("..data") / "routes.yaml")

    async def reloads(ok: int) -> bool:
        return reload_counts(await composer.metrics()) == {"ok": ok, "error": 0}
    await eventually(lambda: reloads(1), "the switch to the ConfigMap layout to be reloaded")
    assert (await composer.get("/home"))[0].headers["Location"] == "/v1"

    publish("2024_02", routes("/v2"))
    old = tmp_path / "..2024_01"
    (old / "routes.yaml").unlink()
    old.rmdir()

    async def moved() -> bool:
        return (await composer.get("/home"))[0].headers["Location"] == "/v2"
    await eventually(moved, "the swapped ConfigMap to be served")
    assert await reloads(2)


# --------------------------------------------------------------------------- --workers 2


async def test_workers_each_poll_and_reload_the_edit(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1"), encoding="utf-8")
    async with Serve(tmp_path, "--workers", "2") as serve:
        workers = await serve.booted_workers(2)
        await all_redirect_to(serve, "/v1")
        assert await serve.reloads() == {"ok": 0, "error": 0}

        replace_file(tmp_path / "routes.yaml", routes("/v2", more=FRESH_ROUTE))
        await serve.wait_reloads(ok=2, error=0)  # summed over the workers: one reload each
        await all_redirect_to(serve, "/v2")
        assert await serve.location("/fresh") == "/fresh-target"
        assert children(serve.pid) == workers
        assert await serve.reloads() == {"ok": 2, "error": 0}


async def test_workers_reload_in_place_on_sighup_to_the_arbiter(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1", interval=0), encoding="utf-8")
    async with Serve(tmp_path, "--workers", "2") as serve:
        workers = await serve.booted_workers(2)
        await all_redirect_to(serve, "/v1")

        replace_file(tmp_path / "routes.yaml", routes("/v2", interval=0, more=FRESH_ROUTE))

        async def still_old() -> bool:
            return await serve.location("/home") == "/v1"
        await stays(still_old, "/home → /v1 in every worker with polling off")
        assert await serve.reloads() == {"ok": 0, "error": 0}

        os.kill(serve.pid, signal.SIGHUP)
        await serve.wait_reloads(ok=2, error=0)
        await all_redirect_to(serve, "/v2")
        assert await serve.location("/fresh") == "/fresh-target"
        assert serve.alive()
        assert children(serve.pid) == workers, "SIGHUP must not replace the workers"


async def test_replacement_worker_serves_the_config_on_disk_not_the_one_of_the_start(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1", interval=0), encoding="utf-8")
    async with Serve(tmp_path, "--workers", "2") as serve:
        first = await serve.booted_workers(2)
        await all_redirect_to(serve, "/v1")

        # Polling is off and no SIGHUP is sent: only a worker started from now on can know.
        replace_file(tmp_path / "routes.yaml", routes("/v2", interval=0))
        for pid in first:
            os.kill(pid, signal.SIGKILL)

        async def replaced() -> set[int] | None:
            pids = await serve.booted_workers(2)
            return pids if not pids & first else None
        await eventually(replaced, "two replacement workers")
        await all_redirect_to(serve, "/v2")
        # The arbiter compiled the new file before forking: the replacements had nothing to reload.
        assert await serve.reloads() == {"ok": 0, "error": 0}
        assert serve.alive()


async def test_replacement_worker_starts_from_the_last_good_config_after_a_refused_edit(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>page</p>\n", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(routes("/v1"), encoding="utf-8")
    async with Serve(tmp_path, "--workers", "2") as serve:
        first = await serve.booted_workers(2)
        replace_file(tmp_path / "routes.yaml", routes("/v2"))
        await serve.wait_reloads(ok=2, error=0)
        await asyncio.sleep(1.5)  # the arbiter follows the files as its loop turns, about once a second
        replace_file(tmp_path / "routes.yaml", "routes: [\n")
        await serve.wait_reloads(ok=2, error=2)
        await asyncio.sleep(1.5)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> set[int] | None:
            pids = await serve.booted_workers(2)
            return pids if victim not in pids else None
        await eventually(replaced, "a replacement worker")
        for _ in range(3):  # new connections spread over both workers
            await all_redirect_to(serve, "/v2")
        assert serve.alive()
