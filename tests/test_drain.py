"""Graceful drain of a real `composer serve` process under load: 50 pages in flight at SIGTERM.

(tests/test_admin.py and tests/test_cli.py drain a single page; this one checks that a
full house of in-flight pages all finish whole, while /readyz says 503 and the page port
refuses newcomers, and that the process then exits 0.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import aiohttp
from aiohttp import web
from conftest import Serve, eventually, write_config

PAGES = 50
FRAGMENT = "<p>slow fragment content</p>"
PAGE = """\
<!DOCTYPE html>
<html><body><p>START of page</p>
<fragment id="slow" src="{url}" timeout="5000"><p>inline fallback</p></fragment>
<p>END of page</p></body></html>
"""


def refuses(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_sigterm_with_50_pages_in_flight_finishes_them_all_then_exits_0(tmp_path, fragments):
    arrived = 0

    async def slow(_: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await asyncio.sleep(1.5)
        return web.Response(text=FRAGMENT, content_type="text/html")

    svc = await fragments({"/slow": slow})
    write_config(tmp_path, {"page.html": PAGE.format(url=svc.url("/slow"))})
    expected = PAGE.format(url=svc.url("/slow")).replace(
        f'<fragment id="slow" src="{svc.url("/slow")}" timeout="5000"><p>inline fallback</p></fragment>', FRAGMENT)

    async with Serve(tmp_path) as composer, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PAGES)) as pages_session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as admin_session:

        async def page() -> tuple[int, str]:
            async with pages_session.get(composer.base + "/page",
                                         timeout=aiohttp.ClientTimeout(total=15)) as resp:
                return resp.status, await resp.text()

        async def readyz() -> int | str:
            try:
                async with admin_session.get(composer.admin + "/readyz",
                                             timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    return resp.status
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                return type(exc).__name__

        assert await readyz() == 200
        tasks = [asyncio.create_task(page()) for _ in range(PAGES)]
        try:
            async def all_in_flight() -> bool:
                return arrived >= PAGES
            await eventually(all_in_flight, f"{PAGES} fragment requests to arrive", deadline=5)
            early = [t.exception() or t.result() for t in tasks if t.done()]
            assert not early, f"pages finished before their fragment answered: {early[:3]}"

            composer.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answers: list[int | str] = []
            refused_while_draining = False
            while not all(t.done() for t in tasks):
                answers.append(await readyz())
                if 503 in answers and not refused_while_draining:
                    refused_while_draining = refuses(composer.port)
                await asyncio.sleep(0.05)
                assert time.monotonic() - signalled < 10, "pages still in flight 10 s after SIGTERM"
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        statuses = [status for status, _ in results]
        assert statuses == [200] * PAGES, statuses
        for _, body in results:
            assert body == expected, body
        assert arrived == PAGES, "the fragment was requested again (a page restarted?)"

        # /readyz: 503 from the moment the drain begins (a 200 only before composer saw the
        # signal), then, once the process is gone, no answer at all.
        assert 503 in answers, f"/readyz never answered 503 during the drain: {answers}"
        first = answers.index(503)
        assert set(answers[:first]) <= {200}, answers
        assert 200 not in answers[first:], f"/readyz answered 200 again while draining: {answers}"
        assert refused_while_draining, "the page port still accepted connections while pages drained"

        code = await asyncio.wait_for(composer.proc.wait(), 10)
        assert code == 0, composer.stderr()
        assert time.monotonic() - signalled < 5
        records = composer.records()
        assert not [r for r in records if r["level"] in ("error", "critical")], composer.stderr()
        messages = [r["msg"] for r in records if r.get("logger") == "composer"]
        assert "stopping: draining in-flight pages" in messages and messages[-1] == "stopped", messages
        access = [r for r in records if r.get("logger") == "composer.access"]
        assert [r["status"] for r in access] == [200] * PAGES, access[-3:]
