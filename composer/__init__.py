"""composer: an asyncio edge proxy that composes HTML pages from fragments.

The public surface is small: load a config, build its route table, serve it.
"""

from .config import Config, load_config
from .errors import ConfigError, Reason
from .routing import RouteTable, build_table
from .server import ComposerServer

__all__ = ["ComposerServer", "Config", "ConfigError", "Reason", "RouteTable", "build_table", "load_config"]
__version__ = "0.1.0"
