"""Optional OpenTelemetry tracing (`otel_enabled`): a span per request in the API and per job in the worker,
joined by the W3C `traceparent` that travels inside the job through the queue.

Off by default and then free: `span()` just passes the incoming traceparent on. The SDK and the OTLP/HTTP
exporter come with the `otel` extra. The provider is ours, not the global one, so a library that installs
its own does not change what we export (and tests can plug in an in-memory exporter).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)
_tracer: Any = None


def setup(enabled: bool, role: str, endpoint: str | None = None, exporter: Any = None) -> None:
    """Install a tracer for this process; `exporter` overrides OTLP (tests pass an in-memory one)."""
    global _tracer
    if not enabled:
        _tracer = None
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError("otel_enabled needs the otel extra: pip install 'dense-serve[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": f"dense-serve-{role}"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(otlp))
    _tracer = provider.get_tracer("dense-serve")
    log.info("OpenTelemetry tracing on (%s)", endpoint or "OTLP default endpoint")


def _parent(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent} if traceparent else {})


def _inject(ctx: Any) -> str | None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    return carrier.get("traceparent")


@contextlib.contextmanager
def span(name: str, traceparent: str | None, **attributes: Any) -> Iterator[str | None]:
    """A child span of `traceparent`; yields the traceparent to hand on (the span's own, when tracing)."""
    if _tracer is None:
        yield traceparent
        return
    from opentelemetry import trace

    with _tracer.start_as_current_span(name, context=_parent(traceparent), attributes=attributes) as current:
        yield _inject(trace.set_span_in_context(current))


def record(name: str, traceparent: str | None, start: float, end: float, **attributes: Any) -> None:
    """A finished span with wall-clock times (seconds): the worker's part of a job, after the fact."""
    if _tracer is None:
        return
    s = _tracer.start_span(name, context=_parent(traceparent), attributes=attributes, start_time=int(start * 1e9))
    s.end(end_time=int(end * 1e9))
