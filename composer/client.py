"""A lean HTTP/1.1 client for fragment GETs: keep-alive pools on llhttp (httptools).

aiohttp's `ClientSession` spends ~70-110 µs of CPU per fragment fetch on uvloop; a page of
20 fragments would cost what Tailor spends on a whole page. This client does only what a
fragment fetch needs, on an `asyncio.Protocol` per connection with llhttp parsing the
responses, at a fraction of that (`bench/client.py` measures both):

- `GET` only: the request line, `Host` (unless the caller gives one) and the caller's
  headers, nothing of its own (no User-Agent, no Accept, no cookies kept); redirects are
  never followed; 1xx answers are skipped.
- Bodies framed by Content-Length, chunked (trailers read and dropped) or the end of the
  connection. `Content-Encoding` gzip / x-gzip / deflate (zlib or raw) / br is decoded as
  it streams in, with `max_bytes` applied to the decoded size while decoding (a bomb costs
  nothing), and a compressed stream must end inside the body (cut short: InvalidResponse).
  A Content-Length over `max_bytes` on an unencoded body fails at the head (TooLarge).
- One pool per origin (scheme, host, port): at most `limit_per_host` connections, callers
  over the limit wait in order (their deadline keeps running), and a connection coming back
  carries the next waiter's request out at once. Callers name what they fetch
  (`share`: the fragment), and the last quarter of a pool only goes to those holding fewer
  than a sixteenth of it: fragments that hang fill three quarters of their origin's pool at
  most, and a healthy fragment on the same origin still gets through. An idle connection expires
  after `keepalive` seconds and is closed, never reused, as soon as it receives anything —
  bytes nobody asked for, or EOF. A connection that read bytes past its response is closed
  too. When a reused connection is closed before any byte of the answer, the request is
  sent once more on a fresh connection (never after a fresh one fails). At most
  `MAX_OPENING` connections to one origin are being opened at once; past that, callers wait
  for one of those or for a connection coming back: a burst (a cold start, a spike) sends a
  service a few dozen handshakes at a time, not hundreds past its accept backlog (asyncio's
  is 100, aiohttp's 128, Node's 511), where each dropped one waits a retransmit (1 s). The
  cap ends at the handshake, not at the service's accept: one too busy to accept can still
  fill its queue.
- No timeouts of its own: the caller's deadline (`asyncio.timeout`) cancels the request,
  and a cancelled request always closes its connection.
- Limits: a header line over `max_field_size` bytes, more than `MAX_HEADERS` header lines or
  a head past what those allow is an InvalidResponse, as is anything llhttp refuses.
- https with `ssl.create_default_context()` (or the context given) and SNI; DNS answers
  from `loop.getaddrinfo` are kept for `dns_ttl` seconds.

Errors are `ClientError`s: `ConnectError` (refused, reset, closed before the answer ended,
DNS, TLS), `InvalidResponse` (not HTTP, limits, a body that does not decode), `TooLarge`,
`InvalidRequest` (CR/LF in a header: never sent).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

import brotli
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["KEEPALIVE", "LIMIT_PER_HOST", "MAX_FIELD_SIZE", "MAX_HEADERS", "Client", "ClientError", "ConnectError",
           "Connection", "Head", "InvalidRequest", "InvalidResponse", "Name", "Response", "Stale", "Ticket", "TooLarge",
           "Waiter"]

# Final: compiled, each is a constant, not a lookup in the module's dict (per header line).
KEEPALIVE: Final = 30.0
DNS_TTL: Final = 300.0
MAX_FIELD_SIZE: Final = 16384
MAX_HEADERS: Final = 128
_DNS_ENTRIES = 1024  # more distinct hosts than this: the cache starts over
_URLS: Final = 1024  # URLs whose pool and target are known by identity (more: that cache starts over)
MAX_OPENING: Final = 32  # connections being opened to one origin at once (see the docstring)
# Connections per origin (settings.max_connections_per_origin's default). 1,024, not 256: a
# 16-page burst of 20-fragment pages already wanted 320 at once, and queued fetches cost
# latency and CPU (bench/PROFILE.md, fourteenth pass). nginx, Node's agent (Tailor's) and Go's
# transport (Skipper's) set no limit at all by default.
LIMIT_PER_HOST: Final = 1024
_SCHEMES = frozenset({"http", "https"})
# Final: compiled, C statics; an imported class is a lookup in the module's dict on every use.
_HEADERS: Final = CIMultiDict
_READ_ONLY: Final = CIMultiDictProxy
# getaddrinfo's answers: (family, type, proto, canonname, sockaddr)
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class ClientError(Exception):
    """A request that produced no response."""


class ConnectError(ClientError):
    """No connection, or the connection failed before the response ended."""


class InvalidResponse(ClientError):
    """What came back is not acceptable HTTP, or its body does not decode."""


class InvalidRequest(ClientError):
    """The request cannot be sent as given (CR or LF inside a header line or the target)."""


class TooLarge(ClientError):
    """The decoded body is over `max_bytes`; `declared` is the Content-Length that said so."""

    def __init__(self, declared: int | None = None) -> None:
        super().__init__("content-length over the limit" if declared is not None else "body over the limit")
        self.declared = declared


class Stale(ConnectError):
    """A reused connection was closed before any byte of the response."""


class Waiter(Protocol):
    """Who gets a request's answer from its connection's callbacks: an `asyncio.Future` (a
    `get`), or `Client.send`'s caller, called back at once rather than woken a loop turn later.
    `done()`: no longer waiting (an answer then is dropped)."""

    def done(self) -> bool: ...

    def set_result(self, result: Response | None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp; the reason is already recorded. (A new
    one each time: re-raising one instance would grow its traceback without end.)"""


class Name:
    """A header name to find a response's lines by (`Head.get`), made once (a module's
    constant): its lowercase bytes, and its usual spelling (`Content-Type`), which is what
    servers send, compared before anything is lowercased."""

    __slots__ = ("lower", "size", "title")

    def __init__(self, name: str) -> None:
        self.lower = name.lower().encode()
        self.title = b"-".join([part.capitalize() for part in self.lower.split(b"-")])
        self.size = len(self.lower)


class Head:
    """A response's header lines as llhttp gave them (bytes). A fetch reads three or four of a
    response's lines, so those are found by `get` and decoded alone; the lines go into a
    multidict (`headers`) only for whoever reads them all (a primary's, a cached entry's).
    Decoding every line and building the multidict for every fragment was ~1 µs of a fetch's
    ~16 (bench/client.py; bench/PROFILE.md, twentieth pass)."""

    __slots__ = ("_headers", "_lines")

    def __init__(self, lines: list[tuple[bytes, bytes]]) -> None:
        self._lines = lines
        self._headers: CIMultiDictProxy[str] | None = None

    def get(self, name: Name) -> str | None:
        """The first line called `name`, in any case; None if there is none."""
        for key, value in self._lines:
            if _named(key, name):
                return _decode(value)
        return None

    def getall(self, name: Name) -> list[str]:
        """Every line called `name`, in order."""
        return [_decode(value) for key, value in self._lines if _named(key, name)]

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """All the lines, decoded once, on first use."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _READ_ONLY(_HEADERS([(_decode(key), _decode(value)) for key, value in self._lines]))
        return headers


def _named(key: bytes, name: Name) -> bool:
    """Whether a line's name `key` is `name`, in any case (lowercased only when its length
    and first letter say it may be)."""
    lower = name.lower
    return len(key) == name.size and (key == name.title or key == lower
                                      or (key[0] | 0x20 == lower[0] and key.lower() == lower))


def _decode(text: bytes) -> str:
    try:  # compiled, a strict UTF-8 decode is a fast path; one with an error handler is not
        return text.decode()
    except UnicodeDecodeError:
        return text.decode("utf-8", "surrogateescape")


_NO_LINES: Final = Head([])
_CONTENT_LENGTH: Final = Name("content-length")
_CONTENT_ENCODING: Final = Name("content-encoding")
_TRANSFER_ENCODING: Final = Name("transfer-encoding")


class Response:
    """A complete response. `body` is the decoded body, or None when `skip_body` said so."""

    __slots__ = ("body", "head", "status")

    def __init__(self, status: int, head: Head, body: bytes | None) -> None:
        self.status = status
        self.head = head
        self.body = body

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.head.headers

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body) if self.body is not None else '-'} bytes>"


# ---------------------------------------------------------------- content decoding

class _Zlib:
    """gzip or deflate (a zlib stream, or raw deflate as some servers send it)."""

    __slots__ = ("_d", "_gzip", "fed")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._d: zlib._Decompress | None = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self.fed = False

    def feed(self, data: bytes, room: int) -> bytes:
        d = self._d
        if d is None:  # deflate: a zlib header (RFC 1950) or, as browsers accept, raw deflate
            first = data[0]
            zlib_header = first & 0x0F == 8 and (len(data) < 2 or ((first << 8) | data[1]) % 31 == 0)
            d = self._d = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        elif d.eof:
            return b""  # after the end of the stream: ignored, and not kept
        self.fed = True
        try:
            out = d.decompress(data, room + 1)  # max_length 0 would mean "no limit"; room + 1 >= 1
        except zlib.error as exc:
            raise InvalidResponse(f"{'gzip' if self._gzip else 'deflate'} body does not decompress: {exc}") from None
        if len(out) > room:
            raise TooLarge
        return out

    def finish(self) -> None:
        if self.fed and self._d is not None and not self._d.eof:
            raise InvalidResponse(f"{'gzip' if self._gzip else 'deflate'} stream cut short")


class _Brotli:
    __slots__ = ("_d", "fed")

    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self.fed = False

    def feed(self, data: bytes, room: int) -> bytes:
        d = self._d
        if d.is_finished():
            return b""
        self.fed = True
        try:
            out: bytes = d.process(data, output_buffer_limit=room + 1)
        except brotli.error as exc:
            raise InvalidResponse(f"br body does not decompress: {exc}") from None
        if len(out) > room:
            raise TooLarge
        return out

    def finish(self) -> None:
        if self.fed and not self._d.is_finished():
            raise InvalidResponse("br stream cut short")


def _decoder(encoding: str) -> _Zlib | _Brotli | None:
    """The decoder for a Content-Encoding; None for identity and codings not known here
    (whose bodies are kept as they are, as aiohttp does)."""
    enc = encoding.strip().lower()
    if enc == "gzip" or enc == "x-gzip":
        return _Zlib(True)
    if enc == "deflate":
        return _Zlib(False)
    if enc == "br":
        return _Brotli()
    return None


# ---------------------------------------------------------------- one connection

class _Conn(asyncio.Protocol):
    """One keep-alive connection and the request in flight on it.

    Ownership: a connection is either in its pool's idle list (`idle`), or owned by one
    caller of `Client.get`, who gives it back (`_Pool.release`) or drops it (`close`, then
    `_Pool.free_slot`). The protocol never frees a slot except for an idle connection.
    """

    __slots__ = ("_chunks", "_decoder", "_head", "_head_room", "_informational", "_max_bytes",
                 "_raw", "_received", "_response", "_size", "_skip", "_status", "_until_close", "closed", "complete", "error",
                 "fut", "headers_done", "idle", "idle_since", "keep_alive", "max_field", "parser", "pool", "requests",
                 "transport")

    # Per request: `_raw` the header lines read so far (a `Head` takes them when the head
    # ends, and trailers start a list of their own), `_chunks` the body's pieces (emptied once
    # delivered, and reused), `_head` the response's lines.
    _raw: list[tuple[bytes, bytes]]
    _chunks: list[bytes]
    _head: Head
    _response: Response | None
    _decoder: _Zlib | _Brotli | None

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # The parser holds this protocol's callbacks: a reference cycle, made when connected and
        # broken when the connection is lost, so a closed connection is freed at once (not by
        # the cyclic collector, which would have to find it: see server.tune_gc).
        self.parser: httptools.HttpResponseParser | None = None
        self.max_field = pool.client.max_field_size
        self.fut: Waiter | None = None
        self.idle = False
        self.idle_since = 0.0
        self.closed = False
        self.requests = 0
        self.keep_alive = False
        self.complete = False
        self.headers_done = False
        self.error: BaseException | None = None
        self._raw = []
        self._chunks = []
        self._head = _NO_LINES
        self._response = None

    # -------- the caller's side

    def send(self, fut: Waiter, data: bytes, max_bytes: int, skip: Callable[[int], bool] | None) -> None:
        """Write the request; `fut` gets its response (or error)."""
        self.fut = fut
        self.requests += 1
        self._received = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error = None
        self._informational = False
        self._head_room = self.pool.client.max_head
        self._size = 0
        self._decoder = None
        self._until_close = False
        self._max_bytes = max_bytes
        self._skip = skip
        transport = self.transport
        if transport.is_closing():  # type: ignore[union-attr]
            # Closed under us, its connection_lost still to come (uvloop would raise on write).
            self._lost(None)
        else:
            transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            fut = self.fut
            if fut is not None:  # only from Client.close(): a request still in flight fails
                self.fut = None
                if not fut.done():
                    fut.set_exception(ConnectError("the client was closed"))
            if self.transport is not None:
                self.transport.abort()

    # -------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        # No local holds the future: run from source, this frame is in the traceback of an
        # error the callbacks raise, and the future holds that error (a reference cycle).
        if self.fut is None:
            self._unrequested()
            return
        self._received = True
        parser = self.parser
        assert parser is not None  # connected, not yet lost
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as raised:
            if self.error is None and not self.complete:  # a bug here, not the peer: let it show
                self.error = raised.__context__ or raised
        except httptools.HttpParserUpgrade:
            if not self.complete:
                self.error = InvalidResponse("unexpected protocol upgrade")
        except httptools.HttpParserError as exc:
            # Also after a complete response: bytes following it that are not HTTP.
            self.error = InvalidResponse(str(exc) or type(exc).__name__)
        if not self.headers_done:  # llhttp keeps a header line until it ends: bound the head
            self._head_room -= len(data)
            if self._head_room < 0 and self.error is None:
                self.error = InvalidResponse("response head too large")
        if self.error is not None or self.complete:
            self._deliver()

    def _deliver(self) -> None:
        fut = self.fut
        assert fut is not None
        self.fut = None
        error, response = self.error, self._response
        self._response = None  # nothing kept while idle
        self._head = _NO_LINES
        self._chunks.clear()  # (reused by the next request: never handed out, unlike a head's lines)
        self._raw.clear()
        # Last: a `Client.send` waiter is called back here, and may give this connection back
        # to its pool, where the next request can be written on it at once.
        if error is not None:
            self.error = None  # handed over: its traceback's frames hold this connection
            self.keep_alive = False
            if not fut.done():  # else cancelled: its owner closes the connection
                fut.set_exception(error)
        elif not fut.done() and response is not None:
            fut.set_result(response)

    def eof_received(self) -> bool | None:
        self._lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        self.parser = None
        self.pool.client._conns.discard(self)

    def _unrequested(self) -> None:
        """Bytes or EOF with no request waiting for them: this connection is done for."""
        self.keep_alive = False
        if self.idle:
            self.idle = False
            self.pool.idle.remove(self)
            self.close()
            self.pool.free_slot()
        else:
            self.close()

    def _lost(self, exc: Exception | None) -> None:
        fut = self.fut
        if fut is None or fut.done():
            if not self.closed:
                self._unrequested()
            self.closed = True
            return
        self.closed = True
        why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        if self.error is not None:
            pass
        elif not self.headers_done:
            if not self._received:
                if self.requests > 1:
                    self.error = Stale(f"reused connection closed before the response{why}")
                else:
                    self.error = ConnectError(f"connection closed before the response{why}")
            else:
                self.error = ConnectError(f"connection closed inside the response head{why}")
        elif self._until_close and exc is None:  # the end of the connection is the end of the body
            try:
                self.on_message_complete()
            except _Stop:
                pass
        else:
            self.error = ConnectError(f"body cut short: connection closed before the body ended{why}")
        self.keep_alive = False
        self._deliver()

    # -------- llhttp callbacks (inside feed_data)

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after our response, in the same read: nobody asked for them, so the
            # connection is not reused. They are parsed on (and dropped: the callbacks below
            # ignore them) so that what is not HTTP fails the fetch, as aiohttp's parser did.
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailers (and the lines of bytes after our response) land in `_raw` too, a new list
        # once the head's lines were taken: dropped, but counted against the limit.
        raw = self._raw
        if len(name) + len(value) > self.max_field or len(raw) >= MAX_HEADERS:
            self.error = InvalidResponse("too many headers" if len(raw) >= MAX_HEADERS else "header line too long")
            raise _Stop
        if value and (value[-1] == 32 or value[-1] == 9):  # llhttp keeps a value's trailing SP/HTAB
            value = value.rstrip(b" \t")
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self.error = InvalidResponse("unexpected 101 Switching Protocols")
                raise _Stop
            self._informational = True  # 1xx: skipped, its headers too
            self._raw = []
            return
        self.headers_done = True
        self._status = status
        self.keep_alive = parser.should_keep_alive()
        self._head = head = Head(self._raw)
        self._raw = []  # for trailers (read and dropped) and the lines of bytes after the response
        skip = self._skip
        if skip is not None and skip(status):
            self._response = Response(status, head, None)
            self.complete = True
            self.keep_alive = False
            raise _Stop
        length = head.get(_CONTENT_LENGTH)
        encoding = head.get(_CONTENT_ENCODING)
        if encoding is None:
            if length is not None and int(length) > self._max_bytes:
                self.error = TooLarge(int(length))
                raise _Stop
        else:
            self._decoder = _decoder(encoding)
        if length is None and status != 204 and status != 304:
            te = head.get(_TRANSFER_ENCODING)
            self._until_close = te is None or te.rsplit(",", 1)[-1].strip().lower() != "chunked"

    def on_body(self, data: bytes) -> None:
        if self.complete:
            return
        room = self._max_bytes - self._size
        decoder = self._decoder
        if decoder is not None:
            try:
                data = decoder.feed(data, room)
            except ClientError as exc:
                self.error = exc
                raise _Stop from None
        elif len(data) > room:
            self.error = TooLarge()
            raise _Stop
        if data:
            self._size += len(data)
            self._chunks.append(data)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self._informational:
            self._informational = False
            return
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.finish()
            except ClientError as exc:
                self.error = exc
                raise _Stop from None
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._response = Response(self._status, self._head, body)  # (on_headers_complete ran: the head came first)
        self.complete = True


# ---------------------------------------------------------------- pools

Connection = _Conn  # what `Client.send` hands its caller, to give back


class _Ticket:
    """A caller waiting for a connection, with the request it will send. A connection coming
    back is handed to it with that request already written (`conn` set, `fut` waiting for the
    response): the waiting caller wakes once, to its answer, and the connection idles for no
    loop turn. A free slot instead sets `fut`'s result to None: the caller opens a connection
    (a `Client.send`'s, through `Client.open_for`)."""

    __slots__ = ("conn", "data", "fut", "max_bytes", "pool", "seq", "share", "skip", "slot")

    def __init__(self, fut: Waiter, share: str | None, data: bytes, max_bytes: int,
                 skip: Callable[[int], bool] | None) -> None:
        self.fut = fut
        self.share = share
        self.data = data
        self.max_bytes = max_bytes
        self.skip = skip
        self.conn: _Conn | None = None
        self.seq = 0  # its place in the pool's queue: parked tickets of two shares compare by it
        self.pool: _Pool | None = None  # a `Client.send`'s: where `Client.open_for` opens its connection
        self.slot = False  # `Client.open_for`'s: a free slot handed to it, not yet in `Client._open`'s hands

    def unused(self, _: asyncio.Task[None]) -> None:
        """`Client.open_for`'s task ended: a slot it never began to use (given up, or cancelled
        before it ran) is passed on."""
        pool = self.pool
        if self.slot and pool is not None:
            self.slot = False
            pool.opening -= 1
            pool.unhold(self.share)
            pool.free_slot()


Ticket = _Ticket  # what `Client.send` hands its caller when the request waits its turn


class _Pool:
    """The connections to one origin: idle ones (a stack), a count, and callers waiting.

    Callers wait in order of arrival. One whose share may not have a connection yet (its share
    full, the pool in its last quarter) is parked with its share's others when it reaches the
    head of the queue: a connection coming back then looks at each parked share's first ticket
    and the queue's, not at every ticket of a hanging fragment queued in front of a healthy one
    (thousands under load: bench/PROFILE.md, fifteenth pass). A caller that gives up leaves its
    ticket queued, done, and passed over when it comes up: removing it would be a scan too.
    """

    __slots__ = ("arrivals", "client", "held", "host", "host_header", "idle", "limit", "loop", "opening", "parked",
                 "port", "reserve", "share", "size", "tls", "waiters")

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, scheme: str, host: str, port: int,
                 host_header: str) -> None:
        self.client = client
        self.loop = loop
        self.host = host
        self.port = port
        self.tls = scheme == "https"
        self.host_header = host_header
        self.idle: list[_Conn] = []
        self.size = 0  # connections open or opening, each holding one slot
        self.opening = 0  # slots handed out to open a connection in, not yet open (or failed)
        self.limit = client.limit_per_host or 1 << 62
        self.reserve = self.limit // 4  # connections only callers holding fewer than `share` may take
        self.share = max(1, self.limit // 16)
        self.held: dict[str, int] = {}  # connections in use (or opening) per caller's share
        self.waiters: deque[_Ticket] = deque()  # in order of arrival, after every parked one
        self.parked: dict[str, deque[_Ticket]] = {}  # per share, in order of arrival
        self.arrivals = 0

    def admits(self, share: str | None, busy: int) -> bool:
        """May a caller of `share` have one more connection when `busy` are in use?"""
        return busy < self.limit - self.reserve or share is None or self.held.get(share, 0) < self.share

    def hold(self, share: str | None) -> None:
        if share is not None:
            self.held[share] = self.held.get(share, 0) + 1

    def unhold(self, share: str | None) -> None:
        if share is not None:
            left = self.held[share] - 1
            if left:
                self.held[share] = left
            else:
                del self.held[share]

    def _next_waiter(self, busy: int) -> _Ticket | None:
        """The first waiter, in order of arrival, that may have a connection when `busy` are in
        use (its share held). Every parked ticket arrived before every queued one."""
        ticket = self._next_parked(busy) if self.parked else None
        if ticket is None:
            waiters = self.waiters
            while waiters:
                head = waiters.popleft()
                if head.fut.done():
                    continue  # gave up
                if self.admits(head.share, busy):
                    ticket = head
                    break
                assert head.share is not None  # (a caller without a share is always admitted)
                queue = self.parked.get(head.share)
                if queue is None:
                    queue = self.parked[head.share] = deque()
                queue.append(head)
            else:
                return None
        self.hold(ticket.share)
        return ticket

    def _next_parked(self, busy: int) -> _Ticket | None:
        """The parked ticket that arrived first of those whose share may now have a connection."""
        found: deque[_Ticket] | None = None
        emptied: list[str] = []
        for share, queue in self.parked.items():
            while queue and queue[0].fut.done():
                queue.popleft()  # gave up
            if not queue:
                emptied.append(share)
            elif (found is None or queue[0].seq < found[0].seq) and self.admits(share, busy):
                found = queue
        for share in emptied:
            del self.parked[share]
        if found is None:
            return None
        ticket = found.popleft()
        if not found:
            assert ticket.share is not None
            del self.parked[ticket.share]
        return ticket

    def take(self, share: str | None, oldest_usable: float) -> _Conn | None:
        """An idle connection that `share` may have, its slot and share now held; expired ones
        on the way are closed."""
        idle = self.idle
        if not idle:
            return None
        while idle and (idle[-1].idle_since <= oldest_usable or idle[-1].closed):
            idle.pop().close()  # expired
            self.size -= 1
        if idle and self.admits(share, self.size - len(idle)):
            conn = idle.pop()
            conn.idle = False
            self.hold(share)
            return conn
        return None

    def wait(self, ticket: _Ticket) -> _Ticket:
        """A free slot, when its share may have one (its result None at once), else a place in
        the queue (see `_Ticket`)."""
        if self.room(ticket.share):
            self.size += 1
            self.opening += 1
            self.hold(ticket.share)
            ticket.fut.set_result(None)
            return ticket
        return self.queue(ticket)

    def room(self, share: str | None) -> bool:
        """Whether a caller of `share` may open a connection now."""
        return self.size < self.limit and self.opening < MAX_OPENING and self.admits(share, self.size - len(self.idle))

    def queue(self, ticket: _Ticket) -> _Ticket:
        """`ticket` waits its turn (see `_Ticket`)."""
        ticket.seq = self.arrivals
        self.arrivals += 1
        self.waiters.append(ticket)
        return ticket

    def abandon(self, share: str | None, conn: _Conn | None, ticket: _Ticket | None,
                fut: asyncio.Future[Response | None] | None) -> None:
        """A caller gave up (cancelled, timed out) or its request failed: its connection is
        closed, never reused; a slot handed to it is passed on; a waiter leaves the queue."""
        if conn is None and ticket is not None:
            conn = ticket.conn
        if conn is not None:
            conn.close()
        elif fut is None:  # pragma: no cover - a connection or a future is always given
            return
        elif not fut.done() or fut.cancelled() or fut.exception() is not None:
            fut.cancel()  # (if still queued: passed over when it comes up)
            return
        else:  # handed a slot just before the cancel: passed on, its connection never opened
            self.opening -= 1
        self.unhold(share)
        self.free_slot()

    def finish(self, share: str | None, conn: _Conn) -> None:
        """A caller's response was read whole: its connection back to the pool, or closed."""
        self.unhold(share)
        if conn.keep_alive and not conn.closed:
            self.release(conn)
        else:
            conn.close()
            self.free_slot()

    def release(self, conn: _Conn) -> None:
        """A connection whose response was read whole, for the next caller."""
        if self.client._closed:
            conn.close()
            return
        conn.idle = True
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        self._wake()
        if conn.idle:
            self.client._expire_later()

    def free_slot(self) -> None:
        """A connection is gone: its slot goes to a waiter (who opens one), or back."""
        self.size -= 1
        self._wake()

    def opened(self) -> None:
        """A connection handed out to open is open, or failed: another may be opened."""
        self.opening -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand idle connections, then free slots, to the waiters that may have them now: a
        connection coming back, or a share falling, can each let one in."""
        if not (self.waiters or self.parked):
            return
        idle = self.idle
        while idle or (self.size < self.limit and self.opening < MAX_OPENING):
            ticket = self._next_waiter(self.size - len(idle))
            if ticket is None:
                return
            if idle:
                conn = idle.pop()
                conn.idle = False
                ticket.conn = conn
                conn.send(ticket.fut, ticket.data, ticket.max_bytes, ticket.skip)
            else:
                self.size += 1
                self.opening += 1
                ticket.fut.set_result(None)


# ---------------------------------------------------------------- the client

class Client:
    """Pooled keep-alive HTTP/1.1 GETs; one per process (see the module docstring)."""

    __slots__ = ("_closed", "_conns", "_dns", "_expiry", "_last", "_loop", "_pools", "_ssl", "_urls", "dns_ttl", "keepalive",
                 "limit_per_host", "max_field_size", "max_head")

    def __init__(self, *, limit_per_host: int = LIMIT_PER_HOST, max_field_size: int = MAX_FIELD_SIZE,
                 keepalive: float = KEEPALIVE, dns_ttl: float = DNS_TTL,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit_per_host = limit_per_host  # 0: no limit
        self.max_field_size = max_field_size
        self.max_head = (MAX_HEADERS + 2) * (max_field_size + 4)  # every line at its longest
        self.keepalive = keepalive
        self.dns_ttl = dns_ttl
        self._ssl = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[_AddrInfo]]] = {}
        self._conns: set[_Conn] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The last headers sent, their lines as sent (with the head's last CRLF) and whether they give the Host.
        self._last: tuple[CIMultiDict[str] | None, bytes, bool] | None = None
        # id(url) → (url, its pool, its request line with Host, and without): `_where`
        self._urls: dict[int, tuple[URL, _Pool, bytes, bytes]] = {}

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this client runs on, found once (on Python 3.11 each
        `asyncio.get_running_loop()` is a getpid() system call)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def get(self, url: URL, headers: CIMultiDict[str] | None = None, *, max_bytes: int,
                  skip_body: Callable[[int], bool] | None = None, share: str | None = None) -> Response:
        """GET `url` → the whole response, its body decoded and at most `max_bytes`.

        `skip_body(status)` true: the body is not read (`Response.body` is None) and the
        connection is closed. `share` names the caller's fair share of the origin's pool (the
        fragment; None: no share, as for a prefetch). Raises ClientError; no deadline of its own.
        """
        if self._closed:
            raise ConnectError("client is closed")
        loop = self.loop
        pool, data = self._request(url, headers, loop)
        fut: asyncio.Future[Response | None] = loop.create_future()
        conn = pool.take(share, loop.time() - self.keepalive)
        ticket = None
        if conn is not None:
            conn.send(fut, data, max_bytes, skip_body)
        else:  # a free slot (`fut` done at once: a connection is opened below), or a wait
            ticket = pool.wait(_Ticket(fut, share, data, max_bytes, skip_body))
        retried = False
        while True:
            try:
                response = await fut
            except Stale:
                # The server had closed this pooled connection; one more try, on a new one
                # (a Stale comes only from a reused connection, never twice in a row).
                if retried:  # pragma: no cover - defensive
                    raise
                retried = True
                pool.opening += 1  # (its slot is held: only the count of connections opening)
            except BaseException:
                pool.abandon(share, conn, ticket, fut)
                # Run from source, this frame is in the error's traceback and the future holds
                # the error: a reference cycle, with the connection in it, unless let go.
                del fut, ticket
                raise
            else:
                if response is not None:
                    break
                # Handed a slot, not a connection: open one in it (below).
            # Awaited outside the `except` clause: compiled, a coroutine suspended inside one
            # leaves its exception in the thread's state, where every other task sees it.
            # A stale connection's slot is still ours.
            conn = await self._open(pool, share)
            fut = loop.create_future()
            conn.send(fut, data, max_bytes, skip_body)
            ticket = None
        if conn is None:
            assert ticket is not None and ticket.conn is not None
            conn = ticket.conn
        pool.finish(share, conn)
        return response

    def send(self, url: URL, headers: CIMultiDict[str], waiter: Waiter, *, max_bytes: int,
             skip_body: Callable[[int], bool], share: str) -> Connection | Ticket | None:
        """`get` without a coroutine, for a caller that has its own (`pipeline.Flight`): its
        answer is handed to `waiter` from the connection's callbacks (a `Stale` error: the server
        had closed the pooled connection; try `get`). The request is written now on an idle pooled
        connection (returned), or, when the pool is full, waits its turn for one (its `Ticket`
        returned, whose `conn` is set when it is written). A ticket handed a free slot instead
        (`waiter.set_result(None)`) asks `open_for` to open a connection in it. None, and nothing
        sent, when a connection may be opened now: that is `get`'s. The caller gives the
        connection back once answered (`finish`), or drops it (`drop`); a ticket given up
        (`waiter.done()`) is passed over."""
        if self._closed:
            return None
        loop = self.loop
        pool, data = self._request(url, headers, loop)
        conn = pool.take(share, loop.time() - self.keepalive)
        if conn is not None:
            conn.send(waiter, data, max_bytes, skip_body)
            return conn
        if pool.room(share):
            return None
        ticket = _Ticket(waiter, share, data, max_bytes, skip_body)
        ticket.pool = pool
        return pool.queue(ticket)

    def open_for(self, ticket: Ticket) -> asyncio.Task[None]:
        """A `send` that waited was handed a free slot: a connection is opened in it, and the
        request written there (its waiter gets a failure to connect as any other error). The
        task may be cancelled (its waiter gave up): the slot is passed on, even if it never ran."""
        ticket.slot = True
        task = self.loop.create_task(self._open_for(ticket))
        task.add_done_callback(ticket.unused)
        return task

    async def _open_for(self, ticket: Ticket) -> None:
        assert ticket.pool is not None
        if ticket.fut.done():  # given up before it ran: `unused` passes the slot on
            return
        ticket.slot = False  # from here `_open` frees it on failure
        try:
            conn = await self._open(ticket.pool, ticket.share)
        except (ClientError, OSError) as exc:  # (its slot and share are freed)
            if not ticket.fut.done():
                ticket.fut.set_exception(exc)
            return
        if ticket.fut.done():  # given up meanwhile
            ticket.pool.abandon(ticket.share, conn, None, None)
            return
        ticket.conn = conn
        conn.send(ticket.fut, ticket.data, ticket.max_bytes, ticket.skip)

    @staticmethod
    def finish(conn: Connection, share: str) -> None:
        """`send`'s answer was read whole: the connection back to its pool (or closed)."""
        conn.pool.finish(share, conn)

    @staticmethod
    def drop(conn: Connection, share: str) -> None:
        """`send`'s caller gave up, or its answer was an error: the connection is closed, never
        reused, and its slot passed on."""
        conn.pool.abandon(share, conn, None, None)

    def _request(self, url: URL, headers: CIMultiDict[str] | None,
                 loop: asyncio.AbstractEventLoop) -> tuple[_Pool, bytes]:
        """`url`'s pool and the request's bytes: its URL's first lines (made once per URL object)
        and the header lines. A page's fragments share one headers object, asked for in a burst,
        so those are made once a page (the object is kept, so `is` cannot match another; callers
        never change headers they passed)."""
        pool, with_host, without_host = self._where(url, loop)
        last = self._last
        if last is None or last[0] is not headers:
            last = self._last = (headers, *_lines(headers))
        return pool, (without_host if last[2] else with_host) + last[1]

    def _where(self, url: URL, loop: asyncio.AbstractEventLoop) -> tuple[_Pool, bytes, bytes]:
        """`url`'s pool and the first lines of its request, with a Host line and without (for
        headers that give one). A compiled template's static `src` is the same URL object page
        after page: it is found by identity, its parts not read, hashed and encoded again on
        every fetch (3 % of a 20-fragment page's instructions). An entry holds its URL, so the id
        cannot be reused while it is there; URLs made per page fill the table and it starts over."""
        known = self._urls.get(id(url))
        if known is not None and known[0] is url:
            return known[1], known[2], known[3]
        pool = self._pools.get((url.scheme, url.raw_host, url.port)) or self._pool(url, loop)  # type: ignore[arg-type]
        without_host = _request_line(url.raw_path_qs)
        with_host = without_host + _encoded(f"Host: {pool.host_header}\r\n")
        if len(self._urls) >= _URLS:
            self._urls.clear()
        self._urls[id(url)] = (url, pool, with_host, without_host)
        return pool, with_host, without_host

    def _pool(self, url: URL, loop: asyncio.AbstractEventLoop) -> _Pool:
        scheme, host, port = url.scheme, url.raw_host, url.port
        if scheme not in _SCHEMES:
            raise ConnectError(f"not an http(s) URL: {str(url)[:200]!r}")
        if not host or port is None:
            raise ConnectError(f"URL has no host: {str(url)[:200]!r}")
        pool = self._pools[(scheme, host, port)] = _Pool(self, loop, scheme, host, port,
                                                         url.host_port_subcomponent or host)
        return pool

    async def _open(self, pool: _Pool, share: str | None) -> _Conn:
        """A new connection to `pool`'s origin, in a slot (and `share`) the caller holds; both
        freed on failure. The slot counts among those opening until this returns."""
        try:
            return await self._connect(pool)
        except BaseException:
            pool.unhold(share)
            pool.free_slot()
            raise
        finally:
            pool.opened()

    async def _connect(self, pool: _Pool) -> _Conn:
        loop = pool.loop
        infos = await self._resolve(loop, pool.host, pool.port)
        sock = None
        error: OSError | None = None
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                break
            except OSError as exc:
                sock.close()
                sock = None
                error = exc
            except BaseException:
                sock.close()
                raise
        if sock is None:
            raise ConnectError(f"cannot connect to {pool.host}:{pool.port}: {type(error).__name__}: {error}")
        conn = _Conn(pool)
        try:
            if pool.tls:
                context = self._ssl
                if context is None:
                    context = self._ssl = ssl.create_default_context()
                await loop.create_connection(lambda: conn, sock=sock, ssl=context, server_hostname=pool.host)
            else:
                await loop.create_connection(lambda: conn, sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot connect to {pool.host}:{pool.port}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            sock.close()
            if conn.transport is not None:
                conn.transport.abort()
            raise
        if self._closed:
            conn.close()
            raise ConnectError("client is closed")
        self._conns.add(conn)
        return conn

    async def _resolve(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[_AddrInfo]:
        key = (host, port)
        now = loop.time()
        entry = self._dns.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        try:
            infos: list[_AddrInfo] = list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            raise ConnectError(f"cannot resolve {host}: {exc}") from None
        if not infos:
            raise ConnectError(f"cannot resolve {host}: no address")
        if len(self._dns) >= _DNS_ENTRIES:
            self._dns.clear()
        self._dns[key] = (now + self.dns_ttl, infos)
        return infos

    def _expire_later(self) -> None:
        if self._expiry is None and not self._closed:
            self._expiry = self._loop.call_later(self.keepalive, self._expire)  # type: ignore[union-attr]

    def _expire(self) -> None:
        """Close idle connections unused for `keepalive` seconds; again later while any are left."""
        self._expiry = None
        now = self._loop.time()  # type: ignore[union-attr]
        oldest_usable = now - self.keepalive
        next_due = None
        for pool in self._pools.values():
            idle = pool.idle
            expired = 0
            for conn in idle:  # oldest first: pushed in order of release
                if conn.idle_since > oldest_usable:
                    break
                expired += 1
            for conn in idle[:expired]:
                conn.idle = False
                conn.close()
                pool.size -= 1
            del idle[:expired]
            if idle and (next_due is None or idle[0].idle_since < next_due):
                next_due = idle[0].idle_since
        if next_due is not None:
            self._expiry = self._loop.call_at(next_due + self.keepalive + 0.01, self._expire)  # type: ignore[union-attr]

    async def close(self) -> None:
        """Close every connection; callers waiting for one get a ConnectError."""
        if self._closed:
            return
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for pool in self._pools.values():
            for queue in (pool.waiters, *pool.parked.values()):
                for ticket in queue:
                    if not ticket.fut.done():
                        ticket.fut.set_exception(ConnectError("client is closed"))
            pool.waiters.clear()
            pool.parked.clear()
            for conn in pool.idle:
                conn.idle = False
            pool.idle.clear()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        await asyncio.sleep(0)  # let the transports close their sockets


def _lines(headers: CIMultiDict[str] | None) -> tuple[bytes, bool]:
    """The header lines as sent, with the CRLF that ends the head, and whether they give the
    Host; refuses CR or LF inside a line (header injection)."""
    if not headers:
        return b"\r\n", False
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise InvalidRequest("a request header or the target holds CR or LF")  # never sent
    return _encoded(text + "\r\n"), "host" in headers


def _request_line(target: str) -> bytes:
    """`GET target HTTP/1.1` as bytes; refuses CR or LF in the target."""
    if "\r" in target or "\n" in target:
        raise InvalidRequest("a request header or the target holds CR or LF")  # never sent
    return _encoded(f"GET {target} HTTP/1.1\r\n")


def _encoded(text: str) -> bytes:
    """`text` as sent; refuses what cannot be."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise InvalidRequest("a request header cannot be encoded") from None
