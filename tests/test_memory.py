"""What a serving process holds, counted from outside (Linux /proc).

- It reuses the memory large fragments free (server.tune_malloc): glibc's default maps each
  block over 128 KiB afresh, so every page with a 1 MiB fragment had the kernel fault in and
  zero its pages again, a third of that page's CPU. Counted as minor page faults over pages
  served after the process has seen the load once.
- A fragment that has arrived but waits to be written (a slower one is ahead of it) holds its
  body, not its response's headers: only a primary's decide anything after the fetch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import Serve, children, eventually, rss_kb, write_config

BIG = 1 << 20  # one fragment of 1 MiB
CONCURRENT = 8
PAGES = 40


def minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[7])  # minflt, field 10 of proc(5)


async def big(_: web.Request) -> web.Response:
    return web.Response(body=b"<div>" + b"x" * (BIG - 11) + b"</div>", content_type="text/html")


@pytest.mark.parametrize("workers", [1, 2], ids=["serve", "serve --workers 2"])
async def test_pages_with_a_large_fragment_reuse_freed_memory(fragments, tmp_path, workers):
    svc = await fragments({"/big": big})
    write_config(tmp_path, {"page.html": f'<html><body><fragment src="{svc.url("/big")}"></fragment></body></html>'})
    async with Serve(tmp_path, "--workers", str(workers)) as serve, aiohttp.ClientSession() as session:
        async def pages(n: int) -> None:
            async def one() -> None:
                async with session.get(serve.base + "/page") as resp:
                    assert resp.status == 200
                    assert len(await resp.read()) > BIG
            for _ in range(n // CONCURRENT):
                await asyncio.gather(*[one() for _ in range(CONCURRENT)])

        pids = {serve.pid}
        if workers > 1:  # the arbiter serves nothing: its workers do
            async def all_up() -> set[int]:
                found = children(serve.pid)
                serve.seen_workers |= found
                return found if len(found) == workers else set()
            pids = await eventually(all_up, "the workers to start")
        await pages(4 * CONCURRENT)  # the heap grows to what eight such pages in flight need
        before = sum(map(minor_faults, pids))
        await pages(PAGES)
        per_page = (sum(map(minor_faults, pids)) - before) / PAGES
    # Each page allocates several MiB (the reads, the body, the page): 256 faults per MiB when
    # fresh (260–390 a page here with glibc's defaults); reused, next to none.
    assert per_page < 64, f"{per_page:.0f} minor page faults per page: freed memory is not reused"


HELD_PAGES = 32
HELD_FRAGMENTS = 100  # each page: a slow fragment first, then these, all answered before it
HEADER_LINES = 24  # each fast fragment's response: 24 header lines of 160 bytes (~4 KB)


async def test_fragments_waiting_behind_a_slow_one_hold_their_body_not_their_headers(fragments, tmp_path):
    gate = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="<p>slow</p>", content_type="text/html")

    heavy = {f"x-header-{i}": "v" * 160 for i in range(HEADER_LINES)}

    async def fast(_: web.Request) -> web.Response:
        return web.Response(text="<p>fast</p>", content_type="text/html", headers=heavy)

    svc = await fragments({"/slow": slow, "/fast": fast})
    tags = "".join(f'<fragment src="{svc.url(f"/fast?i={i}")}"></fragment>' for i in range(HELD_FRAGMENTS))
    write_config(tmp_path, {"page.html": f'<html><body><fragment src="{svc.url("/slow")}"></fragment>{tags}</body></html>'},
                 settings="settings: {max_fragments_per_template: 200, max_fragments_per_page: 200, "
                          "fragment_timeout_ms: 30000, page_timeout_ms: 30000}\n")  # never a fallback here
    async with Serve(tmp_path) as serve, aiohttp.ClientSession() as session:
        async def page() -> bytes:
            async with session.get(serve.base + "/page") as resp:
                assert resp.status == 200
                return await resp.read()

        before = rss_kb(serve.pid)
        pages = [asyncio.ensure_future(page()) for _ in range(HELD_PAGES)]
        try:
            async def all_fast_answered() -> bool:
                return svc.hits.get("/fast", 0) >= HELD_PAGES * HELD_FRAGMENTS
            await eventually(all_fast_answered, "every fast fragment to be answered")
            await asyncio.sleep(0.5)  # composer reads the last answers
            held_mib = (rss_kb(serve.pid) - before) / 1024
        finally:
            gate.set()
            bodies = await asyncio.gather(*pages)
    assert all(body.count(b"<p>fast</p>") == HELD_FRAGMENTS for body in bodies)
    # 3,200 fragments waiting (and the connections, tasks and buffers of their fetches): 8–10
    # MiB here; with their headers kept (24 lines each, two strings a line, in a multidict) 36.
    assert held_mib < 18, f"{held_mib:.1f} MiB held by fragments waiting to be written"
