"""Deadlines for many tasks at once: one loop timer, not one per fetch.

Every fragment fetch has a deadline. A loop timer each (uvloop: a handle object, a libuv
timer allocated, started, stopped and closed, a set entry) was ~4 % of a 20-fragment page's
CPU (bench/PROFILE.md, "Ninth pass"), for timers that almost never fire: a fetch takes
milliseconds, its timeout seconds. Here a deadline is an entry in a bucket per millisecond
(a page's fragments, started together with one timeout, share one); the loop has one timer,
for the earliest bucket, and a bucket emptied before it is due is dropped (the timer, if set
for it, fires once for nothing and moves on to the next bucket still holding a task). When a
bucket is due its tasks are cancelled, as `asyncio.timeout` would: each entry is what to call
then (a task's `cancel`, or `pipeline.Flight.expire` for a fetch that has no task).

Precision is the loop's own: uvloop's clock and timers count whole milliseconds, and a
deadline is rounded up to one, so it never fires early.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

__all__ = ["Deadlines"]


class Deadlines:
    """The deadlines of the fetches running on one loop."""

    __slots__ = ("_buckets", "_due", "_keys", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, set[Callable[[], object]]] = {}  # due (ms of the loop's clock) → cancels
        self._keys: list[int] = []  # a heap of the buckets' due times, pushed as each bucket is made
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0  # what the timer is set for

    def add(self, cancel: Callable[[], object], timeout: float) -> int:
        """Call `cancel` once `timeout` seconds have passed, unless `remove`d before. Returns
        the deadline's key, for `remove` and `passed`."""
        key = int((self._loop.time() + timeout) * 1000) + 1  # rounded up: never early
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
            if self._timer is None or key < self._due:
                self._set(key)
        bucket.add(cancel)
        return key

    def remove(self, cancel: Callable[[], object], key: int) -> None:
        """`cancel`'s deadline no longer applies (its work ended); an emptied bucket is dropped.
        (A bound method is equal to one made of the same object and function.)"""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(cancel)
            if not bucket:
                del self._buckets[key]

    def passed(self, key: int) -> bool:
        """Whether the deadline `key` has passed, its fetches cancelled. (Asked by a task still
        holding it: only that tells a passed deadline from an emptied bucket.)"""
        return key not in self._buckets

    def _set(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = key
        self._timer = self._loop.call_at(key / 1000, self._fire)

    def _fire(self) -> None:
        """Cancel the fetches of every bucket due by now; set the timer for the next one that
        still holds one."""
        self._timer = None
        now = round(self._loop.time() * 1000)
        keys, buckets = self._keys, self._buckets
        while keys and keys[0] <= now:
            bucket = buckets.pop(heapq.heappop(keys), None)
            if bucket is not None:
                for cancel in bucket:
                    cancel()
        while keys and keys[0] not in buckets:  # emptied before they were due
            heapq.heappop(keys)
        if keys:
            self._set(keys[0])
