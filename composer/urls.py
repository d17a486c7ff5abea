"""What composer may fetch: http(s) URLs inside `settings.allowed_origins`, and how a URL
is shown.

One place decides it for fragment `src`/`fallback-src`, manifest versions and backends, so
an allowlist cannot be enforced in one and forgotten in another; and one place (`redact`)
takes the secrets out of a URL composer shows, so no log line or admin page forgets to.
"""

from __future__ import annotations

import fnmatch
import re

from yarl import URL

__all__ = ["origin_allowed", "origin_of", "redact", "url_problem"]

_PROBE = "composerparam"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def redact(url: str) -> str:
    """`url` as composer may show it (logs, errors, /manifest): without userinfo, query or
    fragment, where credentials and tokens travel. Anything not `scheme://…` (a file path) is
    returned as it is.

    Plain string surgery, not a URL parser: it must never fail, nor re-encode what it keeps.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    rest = url[scheme.end():]
    authority_end = next((i for i, ch in enumerate(rest) if ch in "/?#"), len(rest))
    host = rest[:authority_end].rpartition("@")[2]
    path = re.split(r"[?#]", rest[authority_end:], maxsplit=1)[0]
    return f"{scheme.group()}{host}{path}"


def origin_of(url: URL) -> str:
    """`scheme://host:port`, the port always written (80 and 443 too): one spelling per origin,
    so it can key a circuit breaker or a pool and be compared as a string."""
    return f"{url.scheme}://{url.raw_host}:{url.port}"


def origin_allowed(url: URL, allowed: tuple[str, ...]) -> bool:
    """True when `allowed` is empty or one of its `scheme://host[:port]` globs matches `url`."""
    if not allowed:
        return True
    origin = origin_of(url)
    bare = f"{url.scheme}://{url.raw_host}"
    return any(fnmatch.fnmatchcase(origin, p) or fnmatch.fnmatchcase(bare, p) for p in allowed)


def url_problem(raw: str, allowed: tuple[str, ...]) -> str | None:
    """Why `raw` (which may hold `{param}`s) cannot be fetched, or None.

    Parameters are checked in place of a probe value: they may sit in the path or query,
    never in the origin, where a user's value could pick the host.
    """
    probe = _fill(raw)
    try:
        url = URL(probe)
    except ValueError as exc:
        return f"not a valid URL: {raw!r} ({exc})"
    if url.scheme not in ("http", "https") or not url.raw_host:
        return f"must be an absolute http(s) URL, not {raw!r}"
    if _PROBE in f"{url.scheme}{url.raw_user}{url.raw_password}{url.raw_host}{url.port}":
        return "{param} may only appear in the path or query, not the origin"
    if not origin_allowed(url, allowed):
        return f"{raw!r} is outside settings.allowed_origins"
    return None


def _fill(raw: str) -> str:
    """`raw` with each `{param}` replaced by a probe word, so it parses as the URL it will be."""
    out, depth = [], 0
    for ch in raw:
        if ch == "{":
            depth += 1
            if depth == 1:
                out.append(_PROBE)
        elif ch == "}" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)
