"""Releasing a fragment (SPEC §8): `composer manifest smoke|promote|rollback`.

`promote` and `rollback` edit a manifest file in place. A YAML manifest is read with
ruamel.yaml's round-trip composer, whose nodes carry exact start and end offsets: only the
bytes of the values that change are replaced (a key is inserted as one line beside `active`,
or removed with its lines), so comments, order, quoting and layout of everything else stay byte
for byte — a ruamel dump would re-indent an odd layout. A JSON manifest is loaded keeping key
order and written with the indentation it had. Either way the result is checked with
composer's own parser (and must say exactly what was asked, nothing else changed) before it
replaces the file atomically: a temp file in the same folder, fsync, the old mode, rename.
Any refusal leaves the file untouched.

`smoke` checks a candidate manifest with composer's own code: each `active` and `canary`
version fetched by `fragments.fetch` on a `fragments.Session`, its `Link` assets GET, and pages
composed by a real `ComposerServer` on 127.0.0.1, fragment failures read from its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from multidict import CIMultiDict
from ruamel.yaml import YAML
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yarl import URL

from .client import Client, ClientError
from .errors import ConfigError
from .fragments import Failed, Session, fetch, new_session
from .manifest import Canary, Entry, Manifest, parse_manifest
from .metrics import Metrics
from .predicates import PathPredicate
from .routing import RouteTable, load
from .server import ComposerServer
from .urls import redact

__all__ = ["Problem", "Refused", "promote", "rollback", "smoke"]

Changes = dict[str, object]  # key → new value (a str, a {version, percent} dict) or None: remove the key
_ACCEPT = CIMultiDict({"accept-encoding": "gzip, deflate, br", "accept": "text/html"})
_PAGE_BYTES = 64 * 1024 * 1024


class Refused(Exception):
    """The edit is refused (exit 2); the file was not touched."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


# --- promote and rollback ---------------------------------------------------------------

def promote(file: str, fragment: str, version: str, percent: int | None = None) -> str:
    """VERSION becomes the canary at `percent` %, or (no percent) active with the previous
    active kept as `rollback` and the canary dropped. The line saying what changed."""
    path, text, before, manifest = _read(file)
    entry = _entry(manifest, fragment, file)
    if version not in entry.versions:
        raise Refused(f"{file}:{entry.line}: fragment {fragment!r} has no version {version!r} "
                      f"(versions: {', '.join(entry.versions)})")
    if percent is not None:
        if version == entry.active:
            raise Refused(f"{file}:{entry.line}: {fragment} {version} is already active")
        changes: Changes = {"canary": {"version": version, "percent": percent}}
        was = f"{entry.canary.version} at {entry.canary.percent}%" if entry.canary else "none"
        message = f"{fragment}: canary {version} at {percent}% (was {was}); active stays {entry.active}"
    else:
        if version == entry.active and entry.canary is None:
            return f"{file}: {fragment}: {version} is already active; nothing changed"
        changes = {"active": version, "canary": None}
        if version != entry.active:
            changes["rollback"] = entry.active
        message = f"{fragment}: active {entry.active} -> {version}, rollback {changes.get('rollback', entry.rollback)}"
        message += f", canary {entry.canary.version} dropped" if entry.canary else ""
    _apply(path, text, before, manifest, fragment, changes)
    return f"{file}: {message}"


def rollback(file: str, fragment: str) -> str:
    """The fragment's `rollback` version becomes active; the canary is dropped."""
    path, text, before, manifest = _read(file)
    entry = _entry(manifest, fragment, file)
    if entry.rollback is None:
        raise Refused(f"{file}:{entry.line}: fragment {fragment!r} has no rollback version "
                      f"(promote sets one; or add `rollback: \"VERSION\"`)")
    if entry.rollback == entry.active and entry.canary is None:
        return f"{file}: {fragment}: {entry.active} is already active; nothing changed"
    _apply(path, text, before, manifest, fragment, {"active": entry.rollback, "canary": None})
    dropped = f", canary {entry.canary.version} dropped" if entry.canary else ""
    return f"{file}: {fragment}: rolled back, active {entry.active} -> {entry.rollback}{dropped}"


def _read(file: str) -> tuple[Path, str, os.stat_result, Manifest]:
    """The manifest file (symlinks resolved), its text, its stat, and it parsed."""
    path = Path(os.path.realpath(file))
    try:
        before = path.stat()
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"{file}:1: cannot read the manifest: {exc}") from None
    try:
        manifest = parse_manifest(text, file, (), source=file)
    except ConfigError as exc:
        raise Refused(*exc.problems) from None
    return path, text, before, manifest


def _entry(manifest: Manifest, fragment: str, file: str) -> Entry:
    entry = manifest.fragments.get(fragment)
    if entry is None:
        raise Refused(f"{file}:1: no fragment {fragment!r} in the manifest "
                      f"(fragments: {', '.join(manifest.fragments) or 'none'})")
    return entry


def _apply(path: Path, text: str, before: os.stat_result, manifest: Manifest, fragment: str,
           changes: Changes) -> None:
    """Edit, check the result says exactly `changes`, and replace the file."""
    new = _edit_json(text, fragment, changes) if _is_json(text) else _edit_yaml(text, fragment, changes)
    try:
        edited = parse_manifest(new, manifest.source, (), source=manifest.source)
    except ConfigError as exc:
        raise Refused("the edited manifest would not validate:", *exc.problems) from None
    _expect(manifest, edited, fragment, changes)
    _write(path, new.encode("utf-8"), before)


def _expect(old: Manifest, new: Manifest, fragment: str, changes: Changes) -> None:
    """`new` is `old` with `changes` to `fragment`, and nothing else (lines aside)."""
    def same(entry: Entry) -> Entry:
        return dataclasses.replace(entry, line=0, version_lines={})

    want = dict(old.fragments)
    fields: dict[str, object] = {}
    for key, value in changes.items():
        fields[key] = Canary(**value) if isinstance(value, dict) else value
    want[fragment] = dataclasses.replace(old.fragments[fragment], **fields)  # type: ignore[arg-type]
    if {k: same(v) for k, v in want.items()} != {k: same(v) for k, v in new.fragments.items()}:
        raise Refused(f"{new.source}: the edit would change more than {fragment}'s {', '.join(changes)}; "
                      "nothing written (edit this file by hand)")


def _is_json(text: str) -> bool:
    if not text.lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _edit_json(text: str, fragment: str, changes: Changes) -> str:
    """JSON: key order kept, new keys right after `active`, written with the old indentation."""
    data = json.loads(text)
    entry: dict[str, object] = data["fragments"][fragment]
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        elif key in entry:
            old = entry[key]
            entry[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
        else:
            items = list(entry.items())
            at = next(i for i, (k, _) in enumerate(items) if k == "active") + 1
            entry.clear()
            entry.update([*items[:at], (key, value), *items[at:]])
    indent = re.search(r"\n([ \t]+)\S", text)
    out = json.dumps(data, indent=indent[1] if indent else None, ensure_ascii=text.isascii())
    return out + text[len(text.rstrip()):]


def _edit_yaml(text: str, fragment: str, changes: Changes) -> str:
    """YAML: replace, insert or remove only the bytes of the keys that change."""
    root = YAML(typ="rt").compose(text)
    entry = _value(_value(root, "fragments"), fragment)
    if not isinstance(entry, MappingNode):
        raise Refused(f"cannot edit fragment {fragment!r}: not a mapping")
    newline = "\r\n" if "\r\n" in text else "\n"
    edits: list[tuple[int, int, str]] = []
    added: list[str] = []
    for key, value in changes.items():
        pair = _pair(entry, key)
        if pair is None:
            if value is not None:
                added.append(f"{key}: {_render(value, None)}")
        elif value is None:
            edits.append(_removal(text, entry, pair))
        elif isinstance(value, dict) and isinstance(pair[1], MappingNode):
            for sub, sub_value in value.items():
                node = _value(pair[1], sub)
                edits.append((node.start_mark.index, node.end_mark.index, _render(sub_value, node)))
        else:
            edits.append((pair[1].start_mark.index, _end(pair[1]), _render(value, pair[1])))
    if added:
        edits.append(_insertion(text, entry, added, newline))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _pair(mapping: MappingNode, key: str) -> tuple[Node, Node] | None:
    return next(((k, v) for k, v in mapping.value if k.value == key), None)


def _value(mapping: Node, key: str) -> Node:
    """The value of `key` in `mapping`; refused when the file does not spell it out there
    (a merge key or an alias: composer's parser would not have taken it either)."""
    pair = _pair(mapping, key) if isinstance(mapping, MappingNode) else None
    if pair is None:
        raise Refused(f"cannot edit {key!r}: it is not written out as a plain mapping entry; edit by hand")
    return pair[1]


def _end(node: Node) -> int:
    """Where `node`'s text ends: a block collection ends at its last leaf (its end mark is
    the next token's start, past comments that belong to what follows)."""
    while isinstance(node, (MappingNode, SequenceNode)) and node.value and not node.flow_style:
        last = node.value[-1]
        node = last[1] if isinstance(node, MappingNode) else last
    return int(node.end_mark.index)


def _render(value: object, old: Node | None) -> str:
    """A value in YAML, a scalar in the quoting `old` had (double quotes for a new one)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v, None)}" for k, v in value.items()) + "}"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    style = old.style if isinstance(old, ScalarNode) else '"'
    if style == "'":
        return "'" + text.replace("'", "''") + "'"
    if style is None and _plain(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _plain(text: str) -> bool:
    """Does `text` read back as itself when written bare (also inside a flow mapping)?"""
    if text.strip() != text or any(c in text for c in "#,[]{}\"'"):
        return False
    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def _removal(text: str, mapping: MappingNode, pair: tuple[Node, Node]) -> tuple[int, int, str]:
    """The span of one key and its value: whole lines in a block mapping, `, key: value` in a flow one."""
    key, value = pair
    if mapping.flow_style:
        index = mapping.value.index(pair)
        if index > 0:
            return _end(mapping.value[index - 1][1]), _end(value), ""
        return key.start_mark.index, mapping.value[1][0].start_mark.index, ""
    start = text.rfind("\n", 0, key.start_mark.index) + 1
    end = text.find("\n", _end(value))
    return start, len(text) if end < 0 else end + 1, ""


def _insertion(text: str, mapping: MappingNode, lines: list[str], newline: str) -> tuple[int, int, str]:
    """New keys right after `active`: lines at its indentation, or `, key: value` in a flow mapping."""
    value = _value(mapping, "active")
    key = next(k for k, v in mapping.value if v is value)
    at = _end(value)
    if mapping.flow_style:
        return at, at, "".join(f", {line}" for line in lines)
    indent = " " * key.start_mark.column
    end = text.find("\n", at)
    block = "".join(f"{indent}{line}{newline}" for line in lines)
    if end < 0:
        return len(text), len(text), newline + block
    return end + 1, end + 1, block


def _write(path: Path, data: bytes, before: os.stat_result) -> None:
    """Replace `path` atomically with `data`, keeping its mode (and owner, where allowed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode))
            with contextlib.suppress(OSError):
                os.fchown(out.fileno(), before.st_uid, before.st_gid)
            os.fsync(out.fileno())
        now = path.stat()
        if (now.st_mtime_ns, now.st_size, now.st_ino) != (before.st_mtime_ns, before.st_size, before.st_ino):
            raise Refused(f"{path}: changed by someone else while editing; nothing written, try again")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# --- smoke ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Problem:
    """One thing a smoke test found: where (file:line), about what, and what failed."""

    where: str
    subject: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.subject}: {self.what}"


def smoke(config: str, manifest: str, paths: list[str]) -> tuple[list[Problem], dict[str, int]]:
    """Load routes.yaml with `manifest` (raises ConfigError) and smoke-test it: the problems
    and how many versions and pages were checked."""
    table = load(config, manifest)
    return asyncio.run(_smoke(table, manifest, paths))


async def _smoke(table: RouteTable, label: str, paths: list[str]) -> tuple[list[Problem], dict[str, int]]:
    client = new_session()
    server = ComposerServer(table, host="127.0.0.1", port=0, admin_host="127.0.0.1", admin_port=0, grace=1.0)
    await server.start()
    try:
        versions = _versions(table, label)
        targets = _targets(table)
        found = await asyncio.gather(*(_check_version(client, table, *v) for v in versions),
                                     *(_check_pages(client, server, route, where, [path])
                                       for route, where, path in targets))
        problems = [p for group in found for p in group]
        if paths:  # a --path's route is not known beforehand: one at a time, failures counted over all routes
            problems += await _check_pages(client, server, None, "--path", paths)
    finally:
        await server.stop()
        await client.close()
    return problems, {"versions": len(versions), "pages": 2 * (len(targets) + len(paths))}


def _versions(table: RouteTable, label: str) -> list[tuple[Entry, str, str]]:
    """(entry, version, file:line) for every active and canary version of the manifest."""
    found = []
    for entry in table.manifest.fragments.values() if table.manifest else ():
        for version in dict.fromkeys([entry.active, *([entry.canary.version] if entry.canary else [])]):
            found.append((entry, version, f"{label}:{entry.version_lines.get(version, entry.line)}"))
    return found


def _targets(table: RouteTable) -> list[tuple[str, str, str]]:
    """(route name, file:line, path) of each template route (each page of a `template_lookup` one) a plain
    GET reaches: no params, no conditions."""
    found = []
    for route in table.routes:
        if route.template is None and route.pages is None or route.conditions or route.path.params:
            continue
        if route.methods is not None and "GET" not in route.methods:
            continue
        path = route.path.pattern if isinstance(route.path, PathPredicate) else route.path.prefix or "/"
        if route.pages is None:
            found.append((route.name, f"{table.label}:{route.line}", path))
        else:  # template_lookup: each page, `/x` for x.html (`/` is `/index`)
            found += [(route.name, f"{table.label}:{route.line}", f"{path.rstrip('/')}/{name}")
                      for name in route.pages if name]
    return found


async def _check_version(client: Session, table: RouteTable, entry: Entry, version: str,
                         where: str) -> list[Problem]:
    """One version: 2xx `text/html` within its timeout, under max_fragment_bytes; its assets 2xx."""
    url = entry.versions[version]
    subject, shown = f"{entry.name} {version}", redact(url)
    if "{" in url:  # needs a route's params: checked by the pages that use it (--path)
        return []
    settings = table.settings
    timeout = (entry.timeout_ms or settings.fragment_timeout_ms) / 1000
    got = await fetch(client, URL(url), CIMultiDict(_ACCEPT), timeout=timeout, max_bytes=settings.max_fragment_bytes,
                      allow_redirect=False, share=entry.name)
    if isinstance(got, Failed):
        what = f"status {got.status}" if got.status else f"{got.reason.value}: {got.detail}"
        return [Problem(where, subject, f"{what} from {shown}")]
    problems = []
    if not 200 <= got.status < 300:
        problems.append(Problem(where, subject, f"status {got.status} from {shown}"))
    media = got.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/html":
        problems.append(Problem(where, subject, f"content-type {media or 'missing'}, not text/html, from {shown}"))
    answers = await asyncio.gather(*(_asset(client, a.url, timeout) for a in got.assets))
    problems += [Problem(where, subject, what) for what in answers if what is not None]
    return problems


def _skip(_: int) -> bool:
    return True


async def _asset(client: Client, url: str, timeout: float) -> str | None:
    """What is wrong with one `Link` asset (absolute URLs only: a root-relative one is the page's)."""
    target = URL(url)
    if not target.is_absolute():
        return None
    try:
        async with asyncio.timeout(timeout):
            answer = await client.get(target, CIMultiDict(), max_bytes=1, skip_body=_skip)
    except TimeoutError:
        return f"asset {redact(url)}: no answer within {timeout * 1000:.0f} ms"
    except (ClientError, OSError, ValueError) as exc:
        return f"asset {redact(url)}: {exc or type(exc).__name__}"
    return None if 200 <= answer.status < 300 else f"asset {redact(url)}: status {answer.status}"


async def _check_pages(client: Client, server: ComposerServer, route: str | None, where: str,
                       paths: list[str]) -> list[Problem]:
    """GET each path for the active (bucket 99) and the canary (bucket 0) users, one at a time,
    reading fragment failures of `route` (None: any) from the server's metrics."""
    problems = []
    timeout = server.table.settings.page_timeout_ms / 1000 + 1
    for path in paths:
        subject = f"route {route}" if route is not None else f"path {path}"
        for bucket in (99, 0):
            before = _failures(server.metrics, route)
            headers = CIMultiDict({"cookie": f"composer_bucket={bucket}", "accept-encoding": "gzip"})
            try:
                async with asyncio.timeout(timeout):
                    answer = await client.get(URL(server.url + path), headers, max_bytes=_PAGE_BYTES)
            except (TimeoutError, ClientError, OSError, ValueError) as exc:
                problems.append(Problem(where, subject, f"GET {path}: {exc or type(exc).__name__}"))
                continue
            user = "canary users (bucket 0)" if bucket == 0 else "active users (bucket 99)"
            if answer.status >= 400:
                problems.append(Problem(where, subject, f"GET {path} for {user}: status {answer.status}"))
            after = _failures(server.metrics, route)
            for (fragment, version, reason), count in after.items():
                if count > before.get((fragment, version, reason), 0):
                    problems.append(Problem(where, subject, f"GET {path} for {user}: fragment {fragment} "
                                                            f"{version or '(src)'} failed ({reason})"))
    return problems


def _failures(metrics: Metrics, route: str | None) -> dict[tuple[str, str, str], float]:
    """composer_fragment_failures_total by (fragment, version, reason), for `route` (None: summed)."""
    counts: dict[tuple[str, str, str], float] = {}
    for family in metrics.fragment_failures.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and (route is None or labels["route"] == route):
                key = (labels["fragment"], labels["version"], labels["reason"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts
