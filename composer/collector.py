"""The client signals collector script (SPEC §7), and its place in a template's head.

Served by composer at `/_composer/signals.<hash>.js`: Google's web-vitals (attribution build,
vendored from npm at a pinned version by scripts/vendor-web-vitals, licence beside it)
followed by composer's own `static/signals.js`; gzipped once, immutable under its hash. A
route with client signals gets the script tag in its template's head at load, so pages pay
nothing for it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web

from .template import Template

__all__ = ["SCRIPT_PREFIX", "Bundle", "bundle", "with_collector"]

SCRIPT_PREFIX = "/_composer/signals."
_JS = "text/javascript; charset=utf-8"
# The end of the `<head …>` start tag: the collector must run before any fragment markup.
# Comments are skipped so that `<!-- <head> -->` is not taken for it.
_HEAD = re.compile(rb"<!--.*?-->|<head(?:\s[^>]*)?>", re.IGNORECASE | re.DOTALL)
_BEFORE_HEAD = re.compile(rb"\A\s*(?:<!--.*?-->\s*)*(?:<!doctype[^>]*>\s*)?(?:<!--.*?-->\s*)*(?:<html(?:\s[^>]*)?>)?",
                          re.IGNORECASE | re.DOTALL)


class Bundle:
    """web-vitals and signals.js as one script, gzipped once."""

    def __init__(self) -> None:
        static = resources.files("composer") / "static"
        source = ((static / "web-vitals.attribution.iife.js").read_bytes() + b"\n"
                  + (static / "signals.js").read_bytes())
        self.body = source
        self.gzipped = gzip.compress(source, 9, mtime=0)
        self.version = hashlib.sha256(source).hexdigest()[:12]
        self.url = f"{SCRIPT_PREFIX}{self.version}.js"
        self.tag = f'<script src="{self.url}"></script>'.encode()

    def response(self, request: web.BaseRequest) -> web.Response:
        """The script: immutable under its own hash, briefly cacheable under another one (a
        page from an instance running another version, during a rollout)."""
        headers = {"content-type": _JS, "vary": "accept-encoding",
                   "cache-control": "public, max-age=31536000, immutable" if request.path == self.url
                   else "public, max-age=60"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["content-encoding"] = "gzip"
            return web.Response(body=self.gzipped, headers=headers)
        return web.Response(body=self.body, headers=headers)


@cache
def bundle() -> Bundle:
    """The process's collector (its files are part of the installed package: read once)."""
    return Bundle()


def with_collector(template: Template) -> Template:
    """`template` with the collector's script tag right after its `<head>` start tag (or, with
    no head in its first bytes, where the head would begin), marked `client_signals`."""
    chunks = list(template.chunks)
    first = chunks[0] if chunks and isinstance(chunks[0], bytes) else b""
    at = _head_end(first)
    tag = bundle().tag
    if chunks and isinstance(chunks[0], bytes):
        chunks[0] = first[:at] + tag + first[at:]
    else:
        chunks.insert(0, tag)
    return dataclasses.replace(template, chunks=tuple(chunks), client_signals=True)


def _head_end(text: bytes) -> int:
    for match in _HEAD.finditer(text):
        if not match.group().startswith(b"<!--"):
            return match.end()
    before = _BEFORE_HEAD.match(text)
    return before.end() if before else 0
