"""Fetching one fragment: one HTTP attempt, turned into a value.

`fetch()` never raises for anything the network or a fragment service can do: it returns
`Fetched` (a status below 500, its decoded body as UTF-8 and declared assets) or `Failed`
carrying a `Reason`. Its deadline covers connecting, the headers and the whole body (a
trickling body cannot stretch it), and the decoded body is capped so a compression bomb
costs nothing. The HTTP work is `client.Client`'s, a lean keep-alive HTTP/1.1 client on
llhttp; this module turns its answers and errors into values.

Reasons: no complete answer within the deadline is TIMEOUT; a refused, reset or closed
connection is CONNECTION, also when it ends the body early (fewer bytes than
Content-Length, an unfinished chunked body); a status of 500 or more, or an unasked-for
3xx, is STATUS (its body is not read); a body over the cap is TOO_LARGE (a Content-Length
over it, on an unencoded body, is decided on the header); what is not HTTP, a body that does
not decompress (or whose gzip or br stream ends early), or text that is not in its charset
is INVALID.

Pages are UTF-8, so bodies are too: `charset.utf8` checks or transcodes each body (a 3xx
body is never shown, so it is not checked), and `links.assets_of` reads the stylesheets
and scripts its `Link` headers declare.

Pooled keep-alive connections are not trusted blindly: a service that sends more than it
declared must not have those bytes taken as the answer to the next request on that
connection (the bug aiohttp has, aio-libs/aiohttp#13656). The client never reuses a
connection that received bytes past its response, or anything while idle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .charset import charset_of, not_text, utf8
from .client import (
    LIMIT_PER_HOST,
    MAX_FIELD_SIZE,
    Client,
    ClientError,
    Head,
    InvalidRequest,
    InvalidResponse,
    Name,
    Response,
    TooLarge,
)
from .deadlines import Deadlines
from .errors import Reason
from .links import Asset, assets_of

__all__ = ["SKIP", "SKIP_BUT_REDIRECTS", "Failed", "Fetched", "Session", "answer", "failed", "fetch", "new_session"]


@dataclass(slots=True)
class Fetched:
    """A response with status < 500 (3xx only when redirects were asked for) and its body. A
    value, shared by the pages a cache entry serves: never changed once made (not `frozen`,
    whose `__init__` costs four times as much, per fragment; with an `__init__` of its own:
    compiled, that is C, where the dataclass's runs as Python)."""

    status: int
    body: bytes
    head: Head  # its header lines: `head.get` finds one, `headers` (all, decoded) is made on first use
    assets: tuple[Asset, ...]

    def __init__(self, status: int, body: bytes, head: Head, assets: tuple[Asset, ...]) -> None:
        self.status = status
        self.body = body
        self.head = head
        self.assets = assets

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.head.headers


@dataclass(frozen=True, slots=True)
class Failed:
    """Why a fetch did not produce content; `status` is set for reason STATUS."""

    reason: Reason
    detail: str
    status: int | None = None


class Session(Client):
    """The fragment client, and the deadlines of the fetches on it (one timer for all of them)."""

    _deadlines: Deadlines | None = None

    @property
    def deadlines(self) -> Deadlines:
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(self.loop)
        return deadlines


def new_session(*, limit_per_host: int = LIMIT_PER_HOST, max_field_size: int = MAX_FIELD_SIZE) -> Session:
    """The one fragment client of a process: pooled keep-alive connections and a DNS cache.

    Cookies are never stored (a fragment's cookie must not reach another user), redirects
    are never followed, and timeouts are set per fetch as deadlines.
    """
    return Session(limit_per_host=limit_per_host, max_field_size=max_field_size)


def _not_content(status: int) -> bool:
    """A status whose body is never read: 5xx, and 3xx unless redirects were asked for."""
    return status >= 500 or 300 <= status < 400


def _not_content_but_redirects(status: int) -> bool:
    return status >= 500


# Final: compiled, C statics; otherwise each is a lookup in the module's dict on every fetch.
# (Public: `Pipeline.start` hands them to `Client.send` too.)
SKIP: Final = _not_content  # a fragment's fetch
SKIP_BUT_REDIRECTS: Final = _not_content_but_redirects  # a primary's (its 3xx is read), or under compat: tailor
_current_task: Final = asyncio.current_task
# The lines a fetch reads of a response (client.Head decodes those alone).
_CONTENT_TYPE: Final = Name("content-type")
_LINK: Final = Name("link")


async def fetch(session: Session, url: URL, headers: CIMultiDict[str], *, timeout: float, max_bytes: int,
                allow_redirect: bool, share: str | None = None, redirect_body: bool = False) -> Fetched | Failed:
    """One GET with a deadline over connect, headers and body; never raises for I/O trouble.
    `share`: the fragment, whose fair share of its origin's connections this fetch uses.
    `redirect_body`: a 3xx is content, its body read and checked as any other (Tailor's rule,
    under settings.compat: tailor)."""
    # The deadline, as `asyncio.timeout` sets it but without its context object and state
    # machine (a tenth of a 20-fragment page's CPU went there), nor a timer of its own
    # (`Deadlines`): the task is cancelled when it passes, and a CancelledError that the
    # deadline caused (and nobody else) is a timeout.
    task = _current_task(session.loop)
    assert task is not None
    cancelling = task.cancelling()
    deadlines = session.deadlines
    deadline = deadlines.add(task.cancel, timeout)
    try:
        resp = await session.get(url, headers, max_bytes=max_bytes, share=share,
                                 skip_body=SKIP_BUT_REDIRECTS if allow_redirect or redirect_body else SKIP)
    except asyncio.CancelledError:
        if not deadlines.passed(deadline) or task.uncancel() > cancelling:
            raise  # the page went away (or someone besides our deadline cancelled it)
        return Failed(Reason.TIMEOUT, f"no complete response within {timeout * 1000:.0f} ms")
    except (ClientError, OSError) as exc:
        return failed(exc, max_bytes)
    finally:
        deadlines.remove(task.cancel, deadline)
    return answer(resp, max_bytes, redirect_body)


def failed(exc: BaseException, max_bytes: int) -> Failed:
    """What the client's error `exc` (a ClientError or OSError) makes of a fetch."""
    if isinstance(exc, TooLarge):
        if exc.declared is not None:
            return Failed(Reason.TOO_LARGE, f"content-length {exc.declared} > {max_bytes}")
        return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes")
    if isinstance(exc, InvalidResponse):
        return Failed(Reason.INVALID, f"bad response: {exc}")
    if isinstance(exc, InvalidRequest):
        return Failed(Reason.INVALID, f"bad request: {exc}")
    # Refused, reset, or closed before the response ended (short of Content-Length, or
    # mid-chunk): the connection failed.
    return Failed(Reason.CONNECTION, str(exc) if isinstance(exc, ClientError) else f"{type(exc).__name__}: {exc}")


def answer(resp: Response, max_bytes: int, redirect_body: bool = False) -> Fetched | Failed:
    """A whole response as what a fetch makes of it (see `fetch`)."""
    status = resp.status
    body = resp.body
    if body is None:  # 5xx, or an unasked-for 3xx: the body was not read
        return Failed(Reason.STATUS, f"status {status}", status)
    head = resp.head
    if redirect_body or not 300 <= status < 400:  # a redirect's body is never shown (but as content)
        charset = charset_of(head.get(_CONTENT_TYPE))
        text = utf8(body, charset)
        if text is None:
            return Failed(Reason.INVALID, not_text(charset))
        if len(text) > max_bytes:  # transcoding grew it
            return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes as UTF-8")
        body = text
    return Fetched(status, body, head, assets_of(head.getall(_LINK)))
