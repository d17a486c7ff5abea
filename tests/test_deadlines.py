"""composer.deadlines: many tasks' deadlines on one loop timer, on a real loop."""

from __future__ import annotations

import asyncio
import time

from composer.deadlines import Deadlines


async def _sleeper(seconds: float = 10.0) -> str:
    await asyncio.sleep(seconds)
    return "done"


async def test_a_task_is_cancelled_when_its_deadline_passes_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    task = asyncio.create_task(_sleeper())
    started = time.monotonic()
    key = deadlines.add(task.cancel, 0.05)
    assert not deadlines.passed(key)
    try:
        await task
        raise AssertionError("not cancelled")
    except asyncio.CancelledError:
        pass
    assert time.monotonic() - started >= 0.05
    assert deadlines.passed(key)


async def test_removed_deadlines_cancel_nothing_and_leave_no_timer_behind() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    tasks = [asyncio.create_task(_sleeper(0.08)) for _ in range(50)]
    keys = [deadlines.add(task.cancel, 0.03) for task in tasks]
    assert len(set(keys)) <= 2  # started together, one timeout: one bucket (two across a ms)
    for task, key in zip(tasks, keys, strict=True):
        deadlines.remove(task.cancel, key)
    assert await asyncio.gather(*tasks) == ["done"] * 50  # past the deadline: nobody cancelled
    assert deadlines._timer is None and not deadlines._buckets and not deadlines._keys


async def test_a_shorter_deadline_added_later_fires_first() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    long, short = asyncio.create_task(_sleeper()), asyncio.create_task(_sleeper())
    long_key = deadlines.add(long.cancel, 5.0)
    started = time.monotonic()
    short_key = deadlines.add(short.cancel, 0.05)
    await asyncio.wait([short])
    assert short.cancelled() and 0.05 <= time.monotonic() - started < 1.0
    assert not long.done() and not deadlines.passed(long_key) and deadlines.passed(short_key)
    deadlines.remove(long.cancel, long_key)
    long.cancel()


async def test_the_timer_moves_on_to_the_next_deadline_still_held() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    first, second, third = (asyncio.create_task(_sleeper()) for _ in range(3))
    first_key = deadlines.add(first.cancel, 0.03)
    deadlines.add(second.cancel, 0.06)
    third_key = deadlines.add(third.cancel, 0.09)
    deadlines.remove(first.cancel, first_key)  # its bucket empties: the timer still fires, for nothing
    started = time.monotonic()
    await asyncio.wait([second])
    assert second.cancelled() and not third.done() and not first.done()
    await asyncio.wait([third])
    assert third.cancelled() and deadlines.passed(third_key) and time.monotonic() - started >= 0.05
    assert not first.done()
    first.cancel()
