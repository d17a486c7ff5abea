"""`composer serve --workers N`: several processes, one port, summed metrics, graceful TERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from conftest import (
    Serve,
    children,
    eventually,
    free_port,
    html,
    replace_file,
    write_config,
)
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


def _listens(pid: int, port: int) -> bool:
    """Does process `pid` hold a socket listening on 127.0.0.1:`port` (Linux /proc)?"""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # local address, state LISTEN
            inodes.add(fields[9])
    try:
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(fd.startswith("socket:[") and fd[8:-1] in inodes for fd in fds)


def _info(text: str) -> dict[tuple[str, str], float]:
    """composer_fragment_info by (fragment, version)."""
    return {(s.labels["fragment"], s.labels["version"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "composer_fragment_info"
            for s in family.samples}


async def test_a_killed_workers_info_gauges_leave_metrics_so_a_rollback_shows(fragments, tmp_path):
    """SIGKILL skips every cleanup a worker does itself: the arbiter must forget its gauges
    (prometheus_client's live modes + mark_process_dead). Else its last word, canary 2.0 at
    1, outlives the rollback and /metrics shows both versions live (SPEC §9)."""
    svc = await fragments({"/1.0": html("<p>footer 1.0</p>"), "/2.0": html("<p>footer 2.0</p>")})
    entry = {"owner": "team-x", "active": "1.0", "versions": {"1.0": svc.url("/1.0"), "2.0": svc.url("/2.0")}}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"fragments": {"footer": {**entry, "canary": {"version": "2.0", "percent": 50}}}}),
                        encoding="utf-8")
    write_config(tmp_path, {"page.html": '<body><fragment name="footer"></fragment></body>'},
                 settings="settings:\n  reload_interval_ms: 100\n  manifest: manifest.yaml\n")
    async with Serve(tmp_path, "--workers", "2") as serve:
        async def two_workers() -> set[int]:
            found = children(serve.pid)
            serve.seen_workers |= found
            return found if len(found) == 2 else set()

        async def both_serving() -> set[int]:
            """Both workers listen on the admin port: each has declared its gauges (before binding)."""
            found = await two_workers()
            return found if found and all(_listens(pid, serve.admin_port) for pid in found) else set()
        workers = await eventually(both_serving, "two workers on the admin port")
        assert _info(await serve.metrics()) == {("footer", "1.0"): 1, ("footer", "2.0"): 1}

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            found = await two_workers()
            return bool(found) and victim not in found
        await eventually(replaced, "a replacement for the killed worker")
        replace_file(manifest, yaml.safe_dump({"fragments": {"footer": entry}}))

        async def rolled_back() -> bool:
            info = _info(await serve.metrics())
            return info.get(("footer", "1.0")) == 1 and info.get(("footer", "2.0"), 0) == 0
        await eventually(rolled_back, "/metrics to show only 1.0 after the rollback", deadline=10)
