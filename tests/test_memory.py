"""A serving process reuses the memory large fragments free (server.tune_malloc).

glibc's default maps each block over 128 KiB afresh, so every page with a 1 MiB fragment
had the kernel fault in and zero its pages again: a third of that page's CPU. Counted here
from outside, as minor page faults of the serving process (Linux /proc), over pages served
after the process has seen the load once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import Serve, children, eventually, write_config

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
