"""Client signals (SPEC §7): what each fragment does in the browser, per fragment and version.

Three parts, none of them on the page's streaming path beyond a few bytes:

- the collector script (`collector.py`), in the head of every page of a route with signals;
- `PageSignals`: per page, the two marker comments around each fragment's markup and the
  JSON block listing the route, request id, each fragment's id and version, and which
  fragment declared each asset URL (what the collector attributes with).
- `Beacons`: `POST /_composer/signals`. Refused whole: over 16 KB (413), not JSON (400),
  past `client_signals_rate` beacons in a second from one address (429). Entries naming a
  route, fragment, version, kind or vital that the route table does not know are dropped:
  label values come from the table and manifest only, never from a beacon.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cachetools import TTLCache

from .links import Asset
from .metrics import Metrics
from .routing import RouteTable

__all__ = ["BEACON_PATH", "KINDS", "MAX_BEACON_BYTES", "VITALS", "Beacons", "Labels", "PageSignals"]

log = logging.getLogger("composer.signals")

BEACON_PATH = "/_composer/signals"
MAX_BEACON_BYTES = 16 * 1024
KINDS = ("error", "rejection", "asset")
VITALS = ("LCP", "INP", "CLS", "FCP", "TTFB")
_PAGE = "page"  # what cannot be attributed to a fragment
_MAX_ENTRIES = 50  # per beacon: the collector sends at most 20 errors and 5 vitals
_MAX_VITAL_MS = 600_000.0
_MAX_CLS = 100.0
_ADDRESSES = 100_000  # client addresses whose last second of beacons is remembered


@dataclass(frozen=True, slots=True)
class _Route:
    """What a beacon may name on one route: fragment id → (owner, versions)."""

    fragments: Mapping[str, tuple[str, frozenset[str]]]


class Labels:
    """The label values beacons may use, from one route table (rebuilt on each reload)."""

    def __init__(self, table: RouteTable) -> None:
        routes: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
        for route, template in table.templates():  # a template_lookup route's pages share its name
            if not template.client_signals:
                continue
            fragments = routes.setdefault(route.name, {})
            for fragment in template.fragments:
                versions = frozenset(fragment.versions) if fragment.name is not None else frozenset({""})
                owner, known = fragments.get(fragment.id, (fragment.owner, frozenset()))
                fragments[fragment.id] = (owner, known | versions)
        self.routes = {name: _Route(fragments) for name, fragments in routes.items()}

    def series(self) -> Iterable[tuple[str, str, str, str]]:
        """Every (route, fragment, version, kind) a client error can be counted under."""
        for name, route in self.routes.items():
            for kind in KINDS:
                yield name, _PAGE, "", kind
                for fragment, (_, versions) in route.fragments.items():
                    for version in versions:
                        yield name, fragment, version, kind


class Beacons:
    """`POST /_composer/signals`: checks, counts and logs one beacon."""

    def __init__(self, metrics: Metrics, labels: Labels, rate: int) -> None:
        self.metrics = metrics
        self.labels = labels
        self.rate = rate
        self._recent: TTLCache[str, deque[float]] = TTLCache(maxsize=_ADDRESSES, ttl=1.0)

    def apply(self, labels: Labels, rate: int) -> None:
        self.labels, self.rate = labels, rate

    async def receive(self, request: web.BaseRequest) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405, headers={"allow": "POST"})
        if not self._admit(request.remote or ""):
            return self._refused(429, "rate")
        length = request.content_length
        if length is not None and length > MAX_BEACON_BYTES:
            return self._refused(413, "too_large")
        body = await _read(request, MAX_BEACON_BYTES)
        if body is None:
            return self._refused(413, "too_large")
        try:
            beacon = json.loads(body)
        except (ValueError, RecursionError):
            return self._refused(400, "invalid")
        if not isinstance(beacon, dict):
            return self._refused(400, "invalid")
        self._count(beacon)
        return web.Response(status=204)

    def _admit(self, address: str) -> bool:
        """Fewer than `rate` beacons from `address` in the last second (a sliding window).

        The address's times are stored again on each beacon: the cache forgets an entry a
        second after it was *stored*, and forgetting a busy address would let it send `rate`
        more at once, in the same second as its last `rate`."""
        now = time.monotonic()
        seen = self._recent.get(address)
        if seen is None or seen.maxlen != self.rate:  # new, or the rate changed with a reload
            seen = deque(maxlen=self.rate)
        if len(seen) >= self.rate and now - seen[0] < 1.0:
            return False
        seen.append(now)
        self._recent[address] = seen
        return True

    def _refused(self, status: int, reason: str) -> web.Response:
        self.metrics.child(self.metrics.client_dropped, reason).inc()
        return web.Response(status=status)

    def _count(self, beacon: dict[str, Any]) -> None:
        route_name = beacon.get("route")
        route = self.labels.routes.get(route_name) if isinstance(route_name, str) else None
        errors, vitals = beacon.get("e"), beacon.get("v")
        errors = errors if isinstance(errors, list) else []
        vitals = vitals if isinstance(vitals, list) else []
        if route is None:
            self._dropped("unknown", len(errors) + len(vitals))
            return
        assert isinstance(route_name, str)
        # entries past the first _MAX_ENTRIES of each list are not looked at: dropped, counted
        excess = max(len(errors) - _MAX_ENTRIES, 0) + max(len(vitals) - _MAX_ENTRIES, 0)
        errors, vitals = errors[:_MAX_ENTRIES], vitals[:_MAX_ENTRIES]
        rid = _request_id(beacon.get("id"))
        unknown = excess + sum(not self._error(route_name, route, entry, rid) for entry in errors)
        unknown += sum(not self._vital(route_name, route, entry) for entry in vitals)
        self._dropped("unknown", unknown)

    def _dropped(self, reason: str, count: int) -> None:
        if count:
            self.metrics.child(self.metrics.client_dropped, reason).inc(count)

    def _error(self, route_name: str, route: _Route, entry: object, rid: str) -> bool:
        if not (isinstance(entry, list) and len(entry) == 5 and all(isinstance(x, str) for x in entry)):
            return False
        fragment, version, kind, message, source = entry
        if kind not in KINDS:
            return False
        if fragment == _PAGE:
            owner, version = "", ""
        else:
            known = route.fragments.get(fragment)
            if known is None or version not in known[1]:
                return False
            owner = known[0]
        self.metrics.series(self.metrics.client_errors, route_name, fragment, version, kind).inc()
        log.warning("client error", extra={"fields": {
            "fragment": fragment, "version": version, "owner": owner, "route": route_name, "kind": kind,
            "message": message[:300], "source": source[:300], "request_id": rid}})
        return True

    def _vital(self, route_name: str, route: _Route, entry: object) -> bool:
        if not (isinstance(entry, list) and len(entry) == 3):
            return False
        name, value, fragment = entry
        if name not in VITALS or not isinstance(fragment, str) or isinstance(value, bool) \
                or not isinstance(value, (int, float)) or not value >= 0:
            return False
        if fragment != _PAGE and (fragment not in route.fragments or name in ("FCP", "TTFB")):
            return False
        metrics = self.metrics
        if name == "CLS":
            if value > _MAX_CLS:
                return False
            metrics.child(metrics.client_cls, route_name, fragment).observe(value)
        else:
            if value > _MAX_VITAL_MS:
                return False
            metrics.child(metrics.client_vital, route_name, name, fragment).observe(value / 1000)
        return True


async def _read(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` (a chunked one announces no length)."""
    body = bytearray()
    async for chunk in request.content.iter_chunked(8192):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _request_id(value: object) -> str:
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return ""


class PageSignals:
    """One page's part of the signals: fragment markers and the JSON block at its end."""

    __slots__ = ("assets", "fragments", "request_id", "route", "sample", "written")

    def __init__(self, route: str, request_id: str, sample: float) -> None:
        self.route = route
        self.request_id = request_id
        self.sample = sample
        self.fragments: dict[str, tuple[str, str]] = {}  # index → (id, version served)
        self.assets: dict[str, int] = {}  # asset URL → index of the fragment that declared it first
        self.written = False

    def open(self, index: int, fragment: str, version: str, assets: tuple[Asset, ...]) -> bytes:
        """The comment before fragment `index`'s markup; notes its id, version and assets."""
        self.fragments[str(index)] = (fragment, version)
        for asset in assets:
            self.assets.setdefault(asset.url, index)
        return b"<!--composer:%d-->" % index

    @staticmethod
    def close(index: int) -> bytes:
        return b"<!--/composer:%d-->" % index

    def block(self) -> bytes:
        """The `<script type="application/json">` block: data, not code (CSP allows it)."""
        self.written = True
        data = json.dumps({"route": self.route, "id": self.request_id, "sample": self.sample, "beacon": BEACON_PATH,
                           "f": self.fragments, "a": self.assets}, separators=(",", ":"))
        return (b'<script type="application/json" id="composer-signals">'
                + data.replace("<", "\\u003c").encode() + b"</script>")
