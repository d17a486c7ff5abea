"""HTTP header vocabulary shared by the modules that read or write headers (RFC 9110)."""

from __future__ import annotations

import re

__all__ = ["HOP_BY_HOP", "TOKEN"]

# A header name (and a token in general): RFC 9110 §5.6.2.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Headers that describe one connection or one message, never the user (RFC 9110 §7.6.1),
# plus the proxy-auth pair and `expect`, which a proxy answers itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization", "expect"})
