"""`composer serve --workers N`: several processes, one port, summed metrics, graceful TERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import aiohttp
from aiohttp import web
from conftest import children, eventually, free_port, html, write_config
from prometheus_client.parser import text_string_to_metric_families


async def _wait_ready(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.returncode is None, "composer exited early"
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def _requests_total(text: str, route: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "composer_requests":
            return sum(s.value for s in family.samples
                       if s.name == "composer_requests_total" and s.labels["route"] == route)
    return 0.0


async def test_workers_share_the_port_sum_metrics_and_drain_on_term(fragments, tmp_path):
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()  # the page stays in flight until the test lets its fragment answer
        return web.Response(text="<p>slow</p>", content_type="text/html")

    svc = await fragments({"/fast": html("<p>fast</p>"), "/slow": slow})
    config = write_config(tmp_path, {
        "page.html": f'<body><fragment src="{svc.url("/fast")}"></fragment></body>',
        "slow.html": f'<body><fragment src="{svc.url("/slow")}" timeout="8000"></fragment></body>',
    }, routes="""
        routes:
          - {name: page, match: {path: /page}, template: page.html}
          - {name: slow, match: {path: /slow}, template: slow.html}
    """)
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "composer", "serve", "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--admin-port", str(admin), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, f"http://127.0.0.1:{admin}/readyz", proc)
            # New connections each time, so both workers take some.
            for _ in range(20):
                async with aiohttp.ClientSession() as one:
                    async with one.get(f"http://127.0.0.1:{port}/page") as resp:
                        assert resp.status == 200
                        assert "<p>fast</p>" in await resp.text()
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                assert _requests_total(await resp.text(), "page") == 20

            page = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/slow"))

            async def fetching() -> bool:
                return svc.hits.get("/slow") == 1
            await eventually(fetching, "the slow page's fragment request")  # the page is in flight
            assert len(children(proc.pid)) == 2
            proc.send_signal(signal.SIGTERM)

            # The worker with nothing in flight drains at once and exits; the other one still
            # holds the page. Nothing the first leaves behind may break the other: its /metrics
            # (its admin listener closes only after its pages) still sums both workers' counts,
            # and the page, whose fragment is timed and counted only now, completes whole.
            async def one_left() -> bool:
                assert proc.returncode is None, "composer exited with the page in flight"
                return len(children(proc.pid)) == 1
            await eventually(one_left, "the idle worker to exit", deadline=6)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as one, \
                    one.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                assert resp.status == 200, await resp.text()
                assert _requests_total(await resp.text(), "page") == 20
            release.set()
            resp = await page
            assert resp.status == 200
            assert "<p>slow</p>" in await resp.text()
            resp.release()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        out = (await proc.stdout.read()).decode()
        assert f"http://127.0.0.1:{port}" in out and "2 workers" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_refuse_a_bad_config_before_forking(tmp_path):
    config = write_config(tmp_path, {"page.html": "<fragment></fragment>"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "composer", "serve", "--config", str(config), "--workers", "3",
        "--port", str(free_port()), "--admin-port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert err.decode().strip().endswith("needs a `src` (or a `name` from the manifest)")
    assert "page.html:1:" in err.decode()



