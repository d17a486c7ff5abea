"""Fetching one fragment: one HTTP attempt, turned into a value.

This is the only module that touches aiohttp's client exceptions. `fetch()` never raises
for anything the network or a fragment service can do: it returns `Fetched` (a status
below 500, its decoded body and declared assets) or `Failed` carrying a `Reason`. Its
deadline covers connecting, the headers and the whole body (a trickling body cannot
stretch it), and the decoded body is capped so a compression bomb costs nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import Reason

__all__ = ["Asset", "Failed", "Fetched", "fetch", "new_session", "parse_assets"]

_links = aiohttp.ClientResponse.__dict__["links"].wrapped  # aiohttp's Link header parser


@dataclass(frozen=True, slots=True)
class Asset:
    """A stylesheet or script a fragment declared in its `Link` header."""

    kind: Literal["stylesheet", "script"]
    url: str


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response with status < 500 (3xx only when redirects were asked for) and its body."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]
    assets: tuple[Asset, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """Why a fetch did not produce content; `status` is set for reason STATUS."""

    reason: Reason
    detail: str
    status: int | None = None


class _Identity:
    """Stands in for a response URL so aiohttp's parser keeps Link targets as written."""

    @staticmethod
    def join(url: URL) -> URL:
        return url


def new_session(*, limit_per_host: int = 256, max_field_size: int = 16384) -> aiohttp.ClientSession:
    """The one client session of a process: pooled keep-alive connections and a DNS cache.

    Cookies are never stored (a fragment's cookie must not reach another user), redirects
    are never followed, and timeouts are set per fetch as deadlines.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host, ttl_dns_cache=300,
                                     keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        auto_decompress=True,
        trust_env=False,
        max_field_size=max_field_size,
    )


async def fetch(session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str], *,
                timeout: float, max_bytes: int, allow_redirect: bool) -> Fetched | Failed:
    """One GET with a deadline over connect, headers and body; never raises for I/O trouble."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                if status >= 500 or (300 <= status < 400 and not allow_redirect):
                    return Failed(Reason.STATUS, f"status {status}", status)
                length = resp.content_length
                if length is not None and length > max_bytes and "content-encoding" not in resp.headers:
                    return Failed(Reason.TOO_LARGE, f"content-length {length} > {max_bytes}")
                body = await _read_capped(resp.content, max_bytes)
                if body is None:
                    return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes")
                return Fetched(status, body, resp.headers, parse_assets(resp.headers))
    except TimeoutError:
        return Failed(Reason.TIMEOUT, f"no complete response within {timeout * 1000:.0f} ms")
    except aiohttp.ClientPayloadError as exc:
        return Failed(Reason.INVALID, f"bad body: {exc}")
    except aiohttp.ClientResponseError as exc:
        return Failed(Reason.INVALID, f"bad response: {exc.message}")
    except (aiohttp.ClientError, OSError) as exc:
        return Failed(Reason.CONNECTION, f"{type(exc).__name__}: {exc}")


async def _read_capped(content: aiohttp.StreamReader, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_assets(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> tuple[Asset, ...]:
    """Stylesheets and scripts from `Link` headers; malformed entries are skipped, not fatal.

    Each header line is parsed on its own by aiohttp's parser, so one bad line loses only
    itself. Only absolute http(s) and root-relative (`/x.css`) targets are kept.
    """
    lines = headers.getall("link", ())
    if not lines:
        return ()
    assets: list[Asset] = []
    for line in lines:
        try:
            links = _links(SimpleNamespace(headers=CIMultiDict(link=line), url=_Identity))
        except ValueError:
            continue
        for link in links.values():
            url = link.get("url")
            rels = str(link.get("rel", "")).lower().split()
            if not isinstance(url, URL) or not _usable(url):
                continue
            if "stylesheet" in rels:
                assets.append(Asset("stylesheet", str(url)))
            elif "fragment-script" in rels:
                assets.append(Asset("script", str(url)))
    return tuple(assets)


def _usable(url: URL) -> bool:
    if url.scheme in ("http", "https"):
        return bool(url.raw_host)
    return not url.scheme and not url.raw_host and url.raw_path.startswith("/")
