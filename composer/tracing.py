"""Optional OpenTelemetry spans: `pip install 'fragment-composer[otel]'` and set OTEL_EXPORTER_OTLP_ENDPOINT.

Off by default, and then free: the server holds `None` instead of a `Tracing`, and the hot
path pays one `is None` check per page and per fragment. When on, a page is a `compose_page`
server span (its parent is the incoming `traceparent`, if any), each fragment a
`fetch_fragment` client span, and a backend route's request a `proxy_request` server span;
the request sent upstream carries that span's own `traceparent`, so a fragment service's
trace hangs under the fragment that asked, not under the browser's request.

The SDK is imported only here and only when tracing is on, so composer runs without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

__all__ = ["Tracing", "from_env"]

log = logging.getLogger("composer.tracing")

CLOSE_SECONDS = 2.0
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Tracing:
    """Starts composer's spans on one tracer provider (one per process: spans are exported by
    the provider's own thread, which must start after gunicorn forks)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self._tracer = provider.get_tracer("composer")
        self._extract = propagate.extract
        self._inject = propagate.inject
        self._in_context = trace.set_span_in_context
        self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR

    def page(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Span:
        """A server span whose parent is the incoming `traceparent` (a new trace without one)."""
        return self._tracer.start_span(name, context=self._extract(headers), kind=self._server,
                                       attributes=attributes)

    def child(self, name: str, parent: Span, attributes: dict[str, Any]) -> Span:
        return self._tracer.start_span(name, context=self._in_context(parent), kind=self._client,
                                       attributes=attributes)

    def inject(self, span: Span, headers: MutableMapping[str, str]) -> None:
        """Set `traceparent` (and `tracestate`) in `headers` to `span`'s: its child, upstream."""
        for name in ("traceparent", "tracestate"):
            headers.pop(name, None)
        self._inject(headers, context=self._in_context(span))

    def fail(self, span: Span, error_type: str, detail: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(self._error, detail)

    async def close(self, wait: float = CLOSE_SECONDS) -> None:
        """Export what is still queued, waiting at most `wait` seconds: with the collector down
        the SDK would retry for its whole export timeout (10 s), beyond a pod's grace period.
        The flush runs on a daemon thread, which the process does not wait for on exit."""
        flush = threading.Thread(target=self.provider.shutdown, name="composer-otel-shutdown", daemon=True)
        flush.start()
        await asyncio.to_thread(flush.join, wait)


def from_env() -> Tracing | None:
    """A `Tracing` exporting over OTLP when an OTLP endpoint is configured, else None.

    The standard OTEL_* variables apply (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
    OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, …); service.name defaults to "composer".
    """
    if not any(os.environ.get(name) for name in _ENDPOINTS):
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                    "(pip install 'fragment-composer[otel]'); tracing stays off", extra={"fields": {"error": str(exc)}})
        return None
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    attributes = {} if named else {"service.name": "composer"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider)
