"""composer: an asyncio edge proxy that composes HTML pages from fragments.

The public surface is small: `load` routes.yaml (and its manifest and templates) into a
route table, serve it:

    table = composer.load("routes.yaml")
    server = composer.ComposerServer(table, port=8080)
    await server.start()
"""


def _compiled_is_current() -> None:
    """scripts/compile puts C builds of the request path beside their sources, and Python
    imports a build before its source: a source edited since would silently not run. Refuse."""
    import hashlib
    import json
    from pathlib import Path

    package = Path(__file__).parent
    try:
        built: dict[str, str] = json.loads((package / "_native.json").read_text())
    except OSError:
        return  # not compiled: the sources run
    for name, digest in built.items():
        if hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest() != digest:
            raise ImportError(f"{package / name}.py changed after scripts/compile built it: run "
                              f"`python scripts/compile` again, or `python scripts/compile --clean` to run from source")


_compiled_is_current()

from .errors import ConfigError, Reason
from .routing import RouteTable, load
from .server import ComposerServer

__all__ = ["ComposerServer", "ConfigError", "Reason", "RouteTable", "load"]
__version__ = "0.1.0"
