"""OpenTelemetry spans of the shard, continuing the router's trace from gRPC metadata."""

from __future__ import annotations

import contextlib
from typing import Iterator

_tracer = None
_provider = None


def setup(endpoint: str | None, service: str, rank: int) -> None:
    """Export spans over OTLP/HTTP to `endpoint` (nothing when None)."""
    global _tracer, _provider
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": f"{service}.shard", "shard.rank": rank}))
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    _tracer = _provider.get_tracer("tessera-shard")


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def span(name: str, grpc_context, **attributes) -> Iterator[None]:
    """A span for one RPC, child of the caller's `traceparent` if it sent one."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {k: v for k, v in (grpc_context.invocation_metadata() or ()) if k == "traceparent"}
    parent = TraceContextTextMapPropagator().extract(carrier)
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes):
        yield
