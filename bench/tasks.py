"""What a task per fragment costs: the bound on a fetch path without one.

    python bench/tasks.py [--fragments 200000] [--rounds 5]

composer runs each fragment of a page as an asyncio task (compose.py), whose coroutine waits
for the client's response future. The alternative is a fetch path driven by that future's
callbacks, with no task. This times both shapes on uvloop: N futures, each awaited by its own
task, against the same futures each resolving a second future through a done-callback. The
difference is the most a task-free pipeline could save per fragment. Measured on this VM:
about 1–2 µs, against about 60 µs of CPU for a whole fragment (bench/RESULTS.md), so a second
fetch path written as callbacks was not built (bench/PROFILE.md, "Sixth pass").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial

BATCH = 100  # fragments in flight at once, as on a page100 page


async def _leaf(future: asyncio.Future[int]) -> int:
    return await future


async def with_tasks(loop: asyncio.AbstractEventLoop, n: int) -> None:
    for _ in range(n // BATCH):
        futures = [loop.create_future() for _ in range(BATCH)]
        tasks = [loop.create_task(_leaf(f)) for f in futures]
        await asyncio.sleep(0)  # every task runs up to its await, as fetches do
        for f in futures:
            f.set_result(1)
        for t in tasks:
            await t


async def with_callbacks(loop: asyncio.AbstractEventLoop, n: int) -> None:
    def forward(done: asyncio.Future[int], out: asyncio.Future[int]) -> None:
        out.set_result(done.result())

    for _ in range(n // BATCH):
        futures = [loop.create_future() for _ in range(BATCH)]
        outs: list[asyncio.Future[int]] = []
        for f in futures:
            out: asyncio.Future[int] = loop.create_future()
            f.add_done_callback(partial(forward, out=out))
            outs.append(out)
        await asyncio.sleep(0)
        for f in futures:
            f.set_result(1)
        for o in outs:
            await o


async def _time(shape: Callable[[asyncio.AbstractEventLoop, int], Awaitable[None]], n: int) -> float:
    loop = asyncio.get_running_loop()
    started = time.process_time()
    await shape(loop, n)
    return (time.process_time() - started) / n * 1e6


async def _main(n: int, rounds: int) -> None:
    tasks: list[float] = []
    callbacks: list[float] = []
    for _ in range(rounds):  # interleaved: the VM's drift hits both alike
        tasks.append(await _time(with_tasks, n))
        callbacks.append(await _time(with_callbacks, n))
    t, c = statistics.median(tasks), statistics.median(callbacks)
    print(f"CPU µs per fragment (median of {rounds} rounds of {n}): task {t:.2f}, callbacks {c:.2f}; "
          f"a task costs {t - c:.2f} µs more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fragments", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import uvloop

    uvloop.run(_main(args.fragments, args.rounds))


if __name__ == "__main__":
    main()
