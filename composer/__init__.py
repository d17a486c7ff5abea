"""composer: an asyncio edge proxy that composes HTML pages from fragments.

The public surface is small: `load` routes.yaml (and its manifest and templates) into a
route table, serve it:

    table = composer.load("routes.yaml")
    server = composer.ComposerServer(table, port=8080)
    await server.start()
"""

from .errors import ConfigError, Reason
from .routing import RouteTable, load
from .server import ComposerServer

__all__ = ["ComposerServer", "ConfigError", "Reason", "RouteTable", "load"]
__version__ = "0.1.0"
