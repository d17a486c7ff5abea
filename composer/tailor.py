"""`settings.compat: tailor`: Tailor's client protocol, so its templates and fragment services
work unchanged (README "Tailor compatibility").

Everything is decided at load, per template and per fragment: the pipe definition (the AMD
loader and composer's runtime `static/pipe.js`, inlined before the template's first `<script>`
or `<fragment>`, where Tailor puts it), and each fragment's `Slot`: its first script index
(its position × `max_asset_links`, Tailor's stride) and its hook attributes as JSON. A page
only joins these bytes with the fragment's body and script URLs.

Tailor's bugs stay fixed: URLs and attribute values are JSON-escaped into the inline scripts
(`<` as `\\u003c`, so nothing can close the script), stylesheet URLs HTML-escaped, and only
http(s) and root-relative asset URLs are used (`links.parse_assets`).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from .links import Asset, parse_assets
from .nodes import Reader

__all__ = ["DEFAULT_AMD_LOADER", "DEFAULT_TAILOR", "PipeAttribute", "Slot", "TailorSettings", "assets",
           "capped", "definition", "looks_false", "preload", "read_tailor", "slot"]

# Tailor's default `amdLoaderUrl`.
DEFAULT_AMD_LOADER = "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.22/require.min.js"
_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_RESERVED = frozenset(("break", "case", "catch", "class", "const", "continue", "debugger", "default", "delete", "do",
    "else", "export", "extends", "false", "finally", "for", "function", "if", "import", "in", "instanceof", "new",
    "null", "return", "super", "switch", "this", "throw", "true", "try", "typeof", "var", "void", "while", "with",
    "yield", "let", "static", "enum", "await", "implements", "package", "protected", "interface", "private",
    "public", "undefined", "NaN", "Infinity", "eval", "arguments", "window", "document"))
_TAILOR_KEYS = ("amd_loader_url", "max_asset_links", "pipe_instance_name", "pipe_attributes")
_FALSE = frozenset({"false", "0", "no", "off"})
_URL_SAFE = "/:?#[]@!$&'()*+,;=%~"  # a URL's own characters: `<`, `>`, `"` and non-ASCII are encoded


@dataclass(frozen=True, slots=True)
class PipeAttribute:
    """One key of the JSON passed to the hooks, read from a fragment tag's attribute: its value
    (omitted when absent), a list split at `split` (empty when absent), or, `boolean`, whether
    it is present (Tailor's `primary` rule)."""

    key: str
    attribute: str
    split: str | None = None
    boolean: bool = False

    def value(self, attrs: Mapping[str, str | None]) -> object:
        raw = attrs.get(self.attribute)
        if self.boolean:
            return self.attribute in attrs
        if self.split is not None:
            return [] if not raw else raw.split(self.split)
        return (raw or "") if self.attribute in attrs else None


# Tailor's default `pipeAttributes`: {primary, id} (`id` and `range` are always added).
DEFAULT_PIPE_ATTRIBUTES = (PipeAttribute("primary", "primary", boolean=True),)


@dataclass(frozen=True, slots=True)
class TailorSettings:
    """`settings.tailor`: Tailor's options that shape pages (README's migration table)."""

    amd_loader_url: str = DEFAULT_AMD_LOADER
    amd_loader_source: str | None = None  # a `file://` loader's text, read at load and inlined
    max_asset_links: int = 1  # per kind, per fragment; also the index stride
    pipe_instance_name: str = "Pipe"
    pipe_attributes: tuple[PipeAttribute, ...] = DEFAULT_PIPE_ATTRIBUTES  # replaces the default, as in Tailor


DEFAULT_TAILOR = TailorSettings()


def read_tailor(reader: Reader, node: yaml.Node, what: str) -> TailorSettings | None:
    """`settings.tailor: {amd_loader_url, max_asset_links, pipe_instance_name, pipe_attributes}`;
    None when a value is unusable (its problem recorded)."""
    keys = reader.mapping(node, what, _TAILOR_KEYS)
    before = len(reader.problems)
    values: dict[str, object] = {}
    if "amd_loader_url" in keys:
        values.update(_loader(reader, keys["amd_loader_url"], f"{what}.amd_loader_url"))
    if "max_asset_links" in keys:
        values["max_asset_links"] = reader.integer(keys["max_asset_links"], f"{what}.max_asset_links", 1, 100)
    if "pipe_instance_name" in keys:
        name = reader.string(keys["pipe_instance_name"], f"{what}.pipe_instance_name")
        if name is not None and (not _IDENTIFIER.fullmatch(name) or name in _RESERVED):
            reader.error(keys["pipe_instance_name"], f"{what}.pipe_instance_name must be a JavaScript "
                                                     f"identifier that is free to use, not {name!r}")
        values["pipe_instance_name"] = name
    if "pipe_attributes" in keys:
        values["pipe_attributes"] = _pipe_attributes(reader, keys["pipe_attributes"], f"{what}.pipe_attributes")
    if len(reader.problems) > before:
        return None
    return TailorSettings(**values)  # type: ignore[arg-type]  # each value was checked above


def _loader(reader: Reader, node: yaml.Node, what: str) -> dict[str, object]:
    """An http(s) URL, a root-relative one, or `file://PATH` (relative to routes.yaml's folder),
    whose text is read now and inlined in pages, as Tailor does."""
    url = reader.string(node, what)
    if url is None:
        return {}
    if url.startswith("file://"):
        file = Path(reader.label).parent / url.removeprefix("file://")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reader.error(node, f"{what}: cannot read {file}: {exc}")
            return {}
        if re.search(r"</script", text, re.IGNORECASE):
            reader.error(node, f"{what}: {file} contains `</script`, so it cannot be inlined; serve it by URL")
            return {}
        return {"amd_loader_url": url, "amd_loader_source": text}
    if not (url.startswith(("http://", "https://")) and len(url) > 8 or url.startswith("/") and
            not url.startswith("//")) or any(c.isspace() for c in url):
        reader.error(node, f"{what} must be an http(s) URL, a root-relative path (/js/require.js) "
                           f"or file://PATH, not {url!r}")
        return {}
    return {"amd_loader_url": url}


def _pipe_attributes(reader: Reader, node: yaml.Node, what: str) -> tuple[PipeAttribute, ...]:
    """`{key: {attribute: NAME, split: SEP} | {attribute: NAME, boolean: true}}`, in order."""
    out: list[PipeAttribute] = []
    if not isinstance(node, yaml.MappingNode):
        reader.error(node, f"{what} must be a mapping, e.g. {{timingGroups: {{attribute: timing-group, split: ','}}}}")
        return ()
    for key_node, value_node in node.value:
        key = reader.string(key_node, f"a key of {what}")
        spec = reader.mapping(value_node, f"{what}.{key}", ("attribute", "split", "boolean"))
        if key in ("id", "range"):
            reader.error(key_node, f"{what}: {key!r} is always set by composer (as by Tailor)")
        if key is None or "attribute" not in spec:
            if key is not None:
                reader.error(value_node, f"{what}.{key} needs `attribute`, the tag attribute it is read from")
            continue
        attribute = reader.string(spec["attribute"], f"{what}.{key}.attribute")
        split = reader.string(spec["split"], f"{what}.{key}.split") if "split" in spec else None
        boolean = reader.boolean(spec["boolean"], f"{what}.{key}.boolean") if "boolean" in spec else False
        if split is not None and boolean:
            reader.error(value_node, f"{what}.{key}: `split` and `boolean` exclude each other")
        if attribute is not None:
            out.append(PipeAttribute(key, attribute.lower(), split, bool(boolean)))
    return tuple(out)


def looks_false(value: str | None) -> bool:
    """`primary="false"`: set all the same, for Tailor and so for composer under compat."""
    return value is not None and value.strip().lower() in _FALSE


# ---------------------------------------------------------------- the page's bytes


@cache
def _runtime() -> str:
    """static/pipe.js without its leading comment (shipped in the package, read once)."""
    source = (resources.files("composer") / "static" / "pipe.js").read_text(encoding="utf-8")
    return source[source.index("*/") + 2:].strip()


def definition(settings: TailorSettings) -> bytes:
    """The loader and the runtime, defining `window[pipe_instance_name]` synchronously (both
    inline like Tailor's: no request of its own blocks the page)."""
    runtime = f"var {settings.pipe_instance_name}={_runtime()}</script>\n"
    if settings.amd_loader_source is not None:
        return f"<script>{settings.amd_loader_source}\n{runtime}".encode()
    return f'<script src="{html.escape(settings.amd_loader_url)}"></script>\n<script>{runtime}'.encode()


def _json(value: object) -> bytes:
    """JSON that cannot end the inline script it sits in (Tailor wrote URLs raw)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").encode()


@dataclass(frozen=True, slots=True)
class Slot:
    """A fragment's part of Tailor's client protocol, fixed at load (a nested fragment's when
    its parent is placed, composer.nesting): see `wrap`."""

    name: bytes  # settings.tailor.pipe_instance_name
    index: int  # its first script index: its position in the template × max_asset_links
    attrs: bytes  # the hook attributes' JSON up to the end of `range`: `{…,"range":[3,`
    limit: int  # max_asset_links
    is_async: bool

    @property
    def placeholder(self) -> bytes:
        """What an async fragment leaves in place; its `end` call moves the content there."""
        return b"<script data-pipe>%s.placeholder(%d)</script>" % (self.name, self.index)

    def wrap(self, found: tuple[Asset, ...]) -> tuple[bytes, bytes, tuple[Asset, ...]]:
        """Tailor's wrapper for a fragment declaring `found` (at most `limit` of each kind): what
        goes before its body (a `start` call per script, or just `start(i)`), what goes after
        it (the `end` calls, in reverse), and the stylesheets the page writes before it, once
        per page as any asset (SPEC §3): `<link>` tags, an async fragment's as `loadCSS` calls."""
        name, first = self.name, self.index
        styles = tuple(a if not self.is_async else _load_css(name, a)
                       for a in [a for a in found if a.kind == "stylesheet"][:self.limit])
        scripts = [_json(a.url) for a in found if a.kind == "script"][:self.limit]
        if not scripts:
            return (b"<script data-pipe>%s.start(%d)</script>" % (name, first),
                    b"<script data-pipe>%s.end(%d)</script>" % (name, first), styles)
        attrs = b"%s%d]}" % (self.attrs, first + len(scripts) - 1)
        head = b"".join(b"<script data-pipe>%s.start(%d, %s, %s)</script>" % (name, first + i, url, attrs)
                        for i, url in enumerate(scripts))
        tail = b"".join(b"<script data-pipe>%s.end(%d, %s, %s)</script>" % (name, first + i, scripts[i], attrs)
                        for i in range(len(scripts) - 1, -1, -1))
        return head, tail, styles


def _load_css(name: bytes, asset: Asset) -> Asset:
    """An async fragment's stylesheet as Tailor writes it, `NAME.loadCSS("URL")`: an `Asset`
    whose markup is that call, so the page writes it as it writes a `<link>`, once per URL."""
    call = Asset("stylesheet", asset.url)
    object.__setattr__(call, "tag", b"<script>%s.loadCSS(%s)</script>" % (name, _json(asset.url)))
    return call


def preload(settings: TailorSettings) -> str:
    """The AMD loader's entry of a page's `Link` header, first as in Tailor (research §2.2),
    in composer's form and without `crossorigin` (its tag has none); "" for a `file://`
    loader, which is inlined."""
    if settings.amd_loader_source is not None:
        return ""
    return f'<{quote(settings.amd_loader_url, safe=_URL_SAFE)}>; rel="preload"; as="script"'


def slot(attrs: Mapping[str, str | None], position: int, is_async: bool, settings: TailorSettings) -> Slot:
    """The `Slot` of the fragment at `position` (0-based, document order) with these raw tag
    attributes. Its JSON is Tailor's: `pipe_attributes`, then `id` (the tag's, else the first
    index), then `range`."""
    index = position * settings.max_asset_links
    data: dict[str, object] = {}
    for attribute in settings.pipe_attributes:
        value = attribute.value(attrs)
        if value is not None:
            data[attribute.key] = value
    data["id"] = attrs.get("id") or index
    prefix = _json(data)[:-1] + b',"range":[%d,' % index
    return Slot(settings.pipe_instance_name.encode(), index, prefix, settings.max_asset_links, is_async)


def assets(headers: CIMultiDictProxy[str] | CIMultiDict[str], limit: int) -> tuple[Asset, ...]:
    """A fragment's assets as Tailor reads them: `Link` and then `x-amz-meta-link` (S3 object
    metadata), at most `limit` stylesheets and `limit` scripts, in order."""
    return capped(parse_assets(headers) + parse_assets(headers, "x-amz-meta-link"), limit)


def capped(found: tuple[Asset, ...], limit: int) -> tuple[Asset, ...]:
    """The first `limit` stylesheets and `limit` scripts of `found`, in order."""
    kept: list[Asset] = []
    counts = {"stylesheet": 0, "script": 0}
    for asset in found:
        if counts[asset.kind] < limit:
            counts[asset.kind] += 1
            kept.append(asset)
    return tuple(kept)
