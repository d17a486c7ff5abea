"""The fragment manifest (SPEC §5): which versions of each fragment exist and which is live.

Teams deploy fragment versions side by side; the manifest says which one pages use
(`active`), which a slice of users sees (`canary`), and whether the fragment is on at all
(`enabled`). Rolling back is editing `active`: the manifest is part of the config, so a
change is validated and swapped in like any routes.yaml change, without a restart. A
manifest comes from routes.yaml (`fragments:`), a YAML or JSON file, or an http(s) URL
polled with `If-None-Match`; whatever fails to load or validate never replaces a good one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from multidict import CIMultiDict
from yarl import URL

from .breaker import parse_policy
from .client import Client, ClientError, TooLarge
from .errors import ConfigError, Stamp
from .nodes import MAX_TIMEOUT_MS, Reader, file_stamp, parse_yaml
from .urls import redact, url_problem

__all__ = ["MAX_MANIFEST_BYTES", "Canary", "Entry", "Manifest", "ManifestBody", "fetch_manifest", "fetch_once",
           "is_url", "parse_manifest", "read_manifest"]

_ENTRY_KEYS = ("owner", "timeout_ms", "fallback", "versions", "active", "canary", "rollback", "enabled",
               "circuit_breaker")
_CANARY_KEYS = ("version", "percent")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # SPEC §9: a URL manifest is read whole up to this, else refused


@dataclass(frozen=True, slots=True)
class Canary:
    """`canary: {version, percent}`: users whose bucket (0–99) is below `percent` get `version`."""

    version: str
    percent: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One fragment of the manifest; URLs may hold the route's `{param}`s like a `src`."""

    name: str
    owner: str
    versions: Mapping[str, str]
    active: str
    canary: Canary | None = None
    enabled: bool = True
    timeout_ms: int | None = None
    fallback: str | None = None
    line: int = 0
    circuit_breaker: Mapping[str, int] | None = None  # overrides settings.circuit_breaker, key by key
    rollback: str | None = None  # the version `composer manifest rollback` makes active (SPEC §8)
    version_lines: Mapping[str, int] = field(default_factory=dict)  # each version's line in `versions`


@dataclass(frozen=True, slots=True)
class Manifest:
    """A loaded manifest: its fragments, where it came from and when it was read."""

    fragments: Mapping[str, Entry]
    source: str  # "routes.yaml", a file path or a URL (fetched from: show it `redact`ed)
    loaded_at: float = field(default_factory=time.time)
    text: str | None = None  # a URL manifest's body, kept so a routes.yaml reload can reuse it
    etag: str | None = None

    def body(self) -> ManifestBody | None:
        """A URL manifest's body as last fetched, for a reload to reuse; None for a file."""
        if self.text is None:
            return None
        return ManifestBody(url=self.source, text=self.text, etag=self.etag)


def is_url(source: str) -> bool:
    """A manifest source is fetched (http, https) or read (anything else: a file path)."""
    return source.startswith(("http://", "https://"))


def parse_fragments(reader: Reader, node: yaml.Node, allowed: tuple[str, ...]) -> dict[str, Entry]:
    """`fragments:` → entries; problems go to `reader` with their lines."""
    entries: dict[str, Entry] = {}
    if not isinstance(node, yaml.MappingNode):
        reader.error(node, "fragments must be a mapping of fragment names to their entries")
        return entries
    _join_surrogates(reader, node)
    for key_node, value_node in node.value:
        name = str(key_node.value)
        if name in entries:
            reader.error(key_node, f"duplicate fragment {name!r}")
            continue
        entry = _entry(reader, name, key_node.start_mark.line + 1, value_node, allowed)
        if entry is not None:
            entries[name] = entry
    return entries


def _join_surrogates(reader: Reader, node: yaml.Node) -> None:
    """Join surrogate pairs in every scalar under `node`, in place.

    PyYAML reads the escape pair `\\ud83d\\ude00` (how `json.dumps` writes 😀) as two lone
    surrogates, which cannot be encoded: an owner holding them fails every /metrics scrape.
    A surrogate without its pair is a problem.
    """
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, yaml.MappingNode):
            stack.extend(n for pair in item.value for n in pair)
        elif isinstance(item, yaml.SequenceNode):
            stack.extend(item.value)
        elif isinstance(item, yaml.ScalarNode) and any("\ud800" <= c <= "\udfff" for c in item.value):
            try:
                item.value = item.value.encode("utf-16", "surrogatepass").decode("utf-16")
            except UnicodeDecodeError:
                reader.error(item, "not valid Unicode: a \\u escape is half of a surrogate pair")


def _entry(reader: Reader, name: str, line: int, node: yaml.Node, allowed: tuple[str, ...]) -> Entry | None:
    """One fragment of the manifest; None when it has a problem (recorded)."""
    what = f"fragment {name!r}"
    before = len(reader.problems)
    keys = reader.mapping(node, what, _ENTRY_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    owner = reader.string(keys["owner"], f"{what}: owner") if "owner" in keys else ""
    versions: dict[str, str] = {}
    lines: dict[str, int] = {}
    if "versions" not in keys:
        reader.error(node, f"{what} needs `versions`, e.g. {{\"1.0.0\": http://svc/1.0.0/}}")
    elif not isinstance(keys["versions"], yaml.MappingNode) or not keys["versions"].value:
        reader.error(keys["versions"], f"{what}: versions must map version names to URLs")
    else:
        for v_node, url_node in keys["versions"].value:
            url = reader.string(url_node, f"{what}: the URL of version {v_node.value!r}")
            if url is not None:
                _check_url(reader, url_node, url, f"{what} version {v_node.value!r}", allowed)
                versions[str(v_node.value)] = url
                lines[str(v_node.value)] = v_node.start_mark.line + 1
    active = reader.string(keys["active"], f"{what}: active") if "active" in keys else None
    if "active" not in keys:
        reader.error(node, f"{what} needs `active`: the version pages use")
    elif active is not None and versions and active not in versions:
        reader.error(keys["active"], f"{what}: active version {active!r} is not in versions "
                                     f"({', '.join(versions)})")
    canary = _canary(reader, keys["canary"], what, versions) if "canary" in keys else None
    rollback = _rollback(reader, keys["rollback"], what, versions) if "rollback" in keys else None
    enabled = reader.boolean(keys["enabled"], f"{what}: enabled") if "enabled" in keys else True
    timeout_ms = reader.integer(keys["timeout_ms"], f"{what}: timeout_ms", 1, MAX_TIMEOUT_MS) \
        if "timeout_ms" in keys else None
    fallback = reader.string(keys["fallback"], f"{what}: fallback") if "fallback" in keys else None
    if fallback is not None:
        _check_url(reader, keys["fallback"], fallback, f"{what} fallback", allowed)
    breaker = parse_policy(reader, keys["circuit_breaker"], f"{what}: circuit_breaker") \
        if "circuit_breaker" in keys else None
    if len(reader.problems) > before or active is None or owner is None or enabled is None:
        return None
    return Entry(name=name, owner=owner, versions=versions, active=active, canary=canary, enabled=enabled,
                 timeout_ms=timeout_ms, fallback=fallback, line=line, circuit_breaker=breaker, rollback=rollback,
                 version_lines=lines)


def _rollback(reader: Reader, node: yaml.Node, what: str, versions: dict[str, str]) -> str | None:
    """`rollback: "2.3.0"`: the version to go back to; it must be one of `versions`."""
    version = reader.string(node, f"{what}: rollback")
    if version is not None and versions and version not in versions:
        reader.error(node, f"{what}: rollback version {version!r} is not in versions ({', '.join(versions)})")
        return None
    return version


def _canary(reader: Reader, node: yaml.Node, what: str, versions: dict[str, str]) -> Canary | None:
    """`canary: {version, percent}`; the version must be one of `versions`."""
    keys = reader.mapping(node, f"{what}: canary", _CANARY_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    if set(keys) != set(_CANARY_KEYS):
        reader.error(node, f"{what}: canary needs `version` and `percent`")
        return None
    version = reader.string(keys["version"], f"{what}: canary version")
    percent = reader.integer(keys["percent"], f"{what}: canary percent", 0, 100)
    if version is not None and versions and version not in versions:
        reader.error(keys["version"], f"{what}: canary version {version!r} is not in versions")
        return None
    if version is None or percent is None:
        return None
    return Canary(version=version, percent=percent)


def _check_url(reader: Reader, node: yaml.Node, url: str, what: str, allowed: tuple[str, ...]) -> None:
    """A URL composer may fetch (`urls.url_problem`), or a problem at `node`."""
    problem = url_problem(url, allowed)
    if problem is not None:
        reader.error(node, f"{what}: {problem}")


def parse_manifest(text: str, label: str, allowed: tuple[str, ...], *, source: str,
                   etag: str | None = None, keep_text: bool = False) -> Manifest:
    """A manifest document (YAML or JSON, `fragments:` at the top); raises ConfigError."""
    root, problem = parse_yaml(text, label)
    if problem is not None and "\t" in text and _is_json(text):
        # JSON allows tabs between tokens, YAML does not. A valid JSON text has no raw tab
        # inside a string, so spaces in their place change nothing else (lines included).
        root, problem = parse_yaml(text.replace("\t", " "), label)
    if problem is not None:
        raise ConfigError([problem])
    reader = Reader(label)
    if root is None:
        raise ConfigError([f"{label}:1: the manifest is empty; it needs `fragments:`"])
    top = reader.mapping(root, "the manifest", ("fragments",))
    if "fragments" not in top and not reader.problems:
        reader.error(root, "the manifest needs `fragments:`")
    fragments = parse_fragments(reader, top["fragments"], allowed) if "fragments" in top else {}
    if reader.problems:
        raise ConfigError(reader.problems)
    return Manifest(fragments=fragments, source=source, text=text if keep_text else None, etag=etag)


def _is_json(text: str) -> bool:
    """Is `text` JSON (which YAML reads too, except for tabs between tokens)?"""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def read_manifest(file: Path, label: str, allowed: tuple[str, ...]) -> tuple[Manifest, Stamp]:
    """A manifest file and its stamp (taken before reading, for reloads); raises ConfigError."""
    stamp = file_stamp(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{label}:1: manifest not found"], ((file, stamp),)) from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the name
        raise ConfigError([f"{label}:1: cannot read the manifest: {exc}"], ((file, stamp),)) from None
    try:
        return parse_manifest(text, label, allowed, source=str(file)), stamp
    except ConfigError as exc:
        raise ConfigError(exc.problems, ((file, stamp),)) from None


@dataclass(frozen=True, slots=True)
class ManifestBody:
    """A manifest URL's answer: the body and its ETag, or `None` text for 304 Not Modified."""

    url: str
    text: str | None
    etag: str | None


_ACCEPT_ENCODING = "gzip, deflate, br"  # what aiohttp's client asked for before; the client decodes all three


def _not_ok(status: int) -> bool:
    """Only a 200's body is read; any other answer is refused (304 has none)."""
    return status != 200


async def fetch_manifest(client: Client, url: str, etag: str | None, timeout: float = 10.0) -> ManifestBody:
    """GET a manifest URL with composer's fragment client, ETag-aware; raises ConfigError
    saying why it could not be had.

    The body is read to its end, never parsed from a prefix (a cut manifest can be valid YAML
    with a flag missing), and refused once it passes MAX_MANIFEST_BYTES (decoded), without
    holding more than that. `timeout` covers the whole exchange. Userinfo in the URL is sent
    as Basic credentials. Messages show the URL `redact`ed: it may carry credentials.
    """
    shown = redact(url)
    try:
        target, headers = _request(url, etag)
        async with asyncio.timeout(timeout):
            response = await client.get(target, headers, max_bytes=MAX_MANIFEST_BYTES, skip_body=_not_ok)
    except TooLarge:
        raise ConfigError([f"{shown}: manifest larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MB"]) from None
    except (ClientError, TimeoutError, OSError, ValueError) as exc:  # ValueError: no URL yarl can parse
        reason = _without(str(exc), url, shown) or type(exc).__name__
        raise ConfigError([f"{shown}: cannot fetch the manifest: {reason}"]) from None
    if response.status == 304:
        return ManifestBody(url=url, text=None, etag=etag)
    if response.status != 200 or response.body is None:
        raise ConfigError([f"{shown}: manifest answered {response.status}"])
    try:
        text = response.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: cannot fetch the manifest: {exc}"]) from None
    return ManifestBody(url=url, text=text, etag=response.headers.get("etag"))


def _request(url: str, etag: str | None) -> tuple[URL, CIMultiDict[str]]:
    """The URL to GET and its headers; raises ValueError for a URL that cannot be fetched."""
    target = URL(url)
    if not target.raw_host:
        raise ValueError("the URL has no host")
    headers: CIMultiDict[str] = CIMultiDict({"accept-encoding": _ACCEPT_ENCODING})
    if etag:
        headers["if-none-match"] = etag
    if target.user is not None:  # as aiohttp's client did (BasicAuth.from_url), but never an error
        pair = f"{target.user}:{target.password or ''}"  # whose message would quote a secret's character
        raw = pair.encode("latin-1") if max(pair) <= "\xff" else pair.encode("utf-8", "replace")
        headers["authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
    return target.with_user(None), headers


async def fetch_once(url: str) -> ManifestBody:
    """`fetch_manifest` on a client of its own, closed after: for a fetch that is not a poll."""
    client = Client()
    try:
        return await fetch_manifest(client, url, None)
    finally:
        await client.close()


def _without(text: str, url: str, shown: str) -> str:
    """`text` (an exception's message) with every spelling of `url` replaced by `shown`."""
    spellings = {url}
    with contextlib.suppress(ValueError):
        spellings.add(str(URL(url)))
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, shown)
    return text
