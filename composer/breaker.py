"""Circuit breakers: one per fragment and origin, so a sick service costs nothing per page.

A fragment whose service keeps failing still costs every page its whole timeout. The
breaker notices (N failures in a row, or a failure share over a window) and opens: the
fragment goes straight to its fallback without a request. After a cool-down one request
is let through as a probe (half-open); its answer closes the circuit or opens it again.

The policy is config (`settings.circuit_breaker`, overridden per manifest fragment); the
state lives in `Breakers`, owned by one server, and survives reloads: a reload must not
send a burst of requests at a service that is known to be down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from typing import Any

import yaml

from .nodes import Reader

__all__ = ["DEFAULT_POLICY", "Breaker", "BreakerPolicy", "Breakers", "State", "merged", "parse_policy"]


class State(IntEnum):
    """The values of `composer_fragment_circuit_state`."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a circuit opens, and for how long. A rule set to 0 is off; both 0: no breaker."""

    failures: int = 10  # consecutive failures that open the circuit
    failure_percent: int = 50  # ... or this share of failures within `window_s`,
    min_requests: int = 20  # ... once the window holds at least this many requests
    window_s: int = 10
    cooldown_ms: int = 5000  # open this long, then one probe request half-opens it

    @property
    def enabled(self) -> bool:
        return self.failures > 0 or self.failure_percent > 0


DEFAULT_POLICY = BreakerPolicy()

_LIMITS = {"failures": (0, 10_000), "failure_percent": (0, 100), "min_requests": (1, 1_000_000),
           "window_s": (1, 3600), "cooldown_ms": (1, 3_600_000)}
KEYS = tuple(f.name for f in fields(BreakerPolicy))


def parse_policy(reader: Reader, node: yaml.Node, what: str) -> dict[str, Any] | None:
    """`circuit_breaker: {...}` → the keys it sets (a partial override), or None if invalid."""
    keys = reader.mapping(node, what, KEYS)
    before = len(reader.problems)
    values = {key: reader.integer(value, f"{what}.{key}", *_LIMITS[key]) for key, value in keys.items()}
    if len(reader.problems) > before:
        return None
    return values


def merged(base: BreakerPolicy, override: dict[str, Any] | None) -> BreakerPolicy:
    return replace(base, **override) if override else base


class Breaker:
    """The circuit of one fragment at one origin."""

    __slots__ = (
        "_buckets",
        "_changed",
        "_failed",
        "_requests",
        "consecutive",
        "fragment",
        "name",
        "opened_at",
        "origin",
        "policy",
        "probe_at",
        "state",
    )

    def __init__(self, fragment: str, name: str | None, origin: str, policy: BreakerPolicy,
                 changed: Callable[[Breaker], None]) -> None:
        self.fragment, self.name, self.origin, self.policy = fragment, name, origin, policy
        self.state = State.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probe_at = 0.0  # when the outstanding probe was let through (0: none)
        self._buckets: list[list[int]] = []  # [second, requests, failures], oldest first
        self._requests = self._failed = 0  # summed over `_buckets`, all inside the window
        self._changed = changed

    def allow(self, now: float) -> bool:
        """May a request be sent now? In half-open, only the one probe may."""
        if self.state is State.CLOSED:
            return True
        cooldown = self.policy.cooldown_ms / 1000
        if self.state is State.OPEN:
            if now - self.opened_at < cooldown:
                return False
            self._set(State.HALF_OPEN)
        if self.probe_at and now - self.probe_at < cooldown:
            return False  # a probe is out; a lost one (its page went away) is replaced after a cool-down
        self.probe_at = now
        return True

    def record(self, ok: bool, now: float) -> None:
        """The verdict on a request `allow` let through."""
        self.probe_at = 0.0
        if ok and not self._failed and self.state is State.CLOSED:
            # The common case, short: no failure in the window, so no rule can trip.
            buckets = self._buckets
            if buckets and buckets[-1][0] == int(now):
                buckets[-1][1] += 1
                self._requests += 1
                self.consecutive = 0
                return
        if self.state is not State.CLOSED:
            if ok:
                self.consecutive = 0
                self._buckets.clear()
                self._requests = self._failed = 0
                self._set(State.CLOSED)
            else:
                self._open(now)
            return
        second = int(now)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            horizon = second - self.policy.window_s
            while buckets and buckets[0][0] <= horizon:
                _, requests, failures = buckets.pop(0)
                self._requests -= requests
                self._failed -= failures
            buckets.append([second, 0, 0])
        bucket = buckets[-1]  # every bucket kept is inside the window: the sums are the window's
        bucket[1] += 1
        self._requests += 1
        policy = self.policy
        if ok:
            self.consecutive = 0
        else:
            bucket[2] += 1
            self._failed += 1
            self.consecutive += 1
        if policy.failures and self.consecutive >= policy.failures:
            self._open(now)
        elif policy.failure_percent:  # checked on successes too: one may complete min_requests
            total = self._requests
            if total >= policy.min_requests and self._failed * 100 >= policy.failure_percent * total:
                self._open(now)

    def release(self) -> None:
        """The request let through ended without a verdict (its page was cancelled)."""
        self.probe_at = 0.0

    def _open(self, now: float) -> None:
        self.opened_at = now
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._changed(self)

    def view(self, now: float) -> dict[str, object]:
        return {"fragment": self.fragment, "origin": self.origin, "state": self.state.name.lower(),
                "consecutive_failures": self.consecutive,
                "open_for_s": round(now - self.opened_at, 1) if self.state is State.OPEN else None}


class Breakers:
    """Every breaker of a server, by (fragment id, origin); `changed` hears each transition."""

    def __init__(self, changed: Callable[[Breaker], None]) -> None:
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._changed = changed

    def get(self, fragment: str, name: str | None, origin: str, policy: BreakerPolicy) -> Breaker:
        breaker = self._breakers.get((fragment, origin))
        if breaker is None:
            breaker = self._breakers[(fragment, origin)] = Breaker(fragment, name, origin, policy, self._changed)
        elif breaker.policy is not policy:
            breaker.policy = policy  # a reload changed it; the state carries on
        return breaker

    def retain(self, wanted: set[tuple[str, str]]) -> set[str]:
        """Forget the circuits of (fragment id, origin) pairs no config fetches any more (a
        rolled-back canary's origin is never probed again: its circuit would stay open, and
        page, forever); the fragment ids whose circuits changed."""
        gone = [key for key in self._breakers if key not in wanted]
        for key in gone:
            del self._breakers[key]
        return {fragment for fragment, _ in gone}

    def worst(self, fragment: str) -> State:
        """The fragment's state for the gauge: its worst circuit over all its origins."""
        return max((b.state for (f, _), b in self._breakers.items() if f == fragment), default=State.CLOSED)

    def of(self, name: str) -> list[Breaker]:
        """The circuits of manifest fragment `name` (any id a template gave it)."""
        return [b for b in self._breakers.values() if b.name == name]

    def all(self) -> list[Breaker]:
        return list(self._breakers.values())

    @staticmethod
    def now() -> float:
        return time.monotonic()
