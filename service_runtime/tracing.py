"""OpenTelemetry tracing, configured in one place from the standard OTEL_* variables.

Every composition root (the web app factory, `saga relay`, `saga consume`, the rq worker's
jobs) calls `configure_tracing(service, role)` once. Tracing is on when the environment asks
for an exporter, as the OpenTelemetry SDK documents it:

- `OTEL_TRACES_EXPORTER`: `otlp` (OTLP over HTTP/protobuf), `console`, or `none`;
- without it, `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set means
  `otlp`;
- `OTEL_SDK_DISABLED=true` turns it off whatever else is set.

The SDK itself reads the rest: `OTEL_SERVICE_NAME` (default: the service's own name),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_EXPORTER_OTLP_*` (headers,
timeout, compression), `OTEL_BSP_*` (batching).

Off, nothing of the SDK is imported, no instrumentation is installed, and the hot paths (an
outbox row, a consumed entry, a published row) check one module flag: tracing costs nothing
measurable.

The trace context (W3C `traceparent`) travels with the work: the HTTP request's (continued
from an incoming `traceparent` header by the Flask instrumentation) is stored with each
outbox row it writes, the relay publishes the row in a PRODUCER span (a child of it) and
carries that span's context as the stream entry's `traceparent` field, and the consumer
handles the entry in a CONSUMER span (a child of that), inside which the events it emits are
written. One order's saga is so one trace across the services.

Database queries outside any traced work (relay polls, lease heartbeats, the fence of an
empty read) would each be a one-span trace of their own; they are not recorded
(`sampler`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from contracts import base_of, partition_index

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
INSTRUMENTATION_NAME = "saga.service_runtime"

# True once configure_tracing (or enable_for_tests) installed a provider in this process.
ENABLED = False
_SERVICE: str | None = None
_NULL = nullcontext()


def requested_exporter(environ: Mapping[str, str] | None = None) -> str | None:
    """The exporter the environment asks for (`otlp`, `console`), or None: tracing off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        names = [n.strip().lower() for n in exporter.split(",") if n.strip()]
        names = [n for n in names if n != "none"]
        return names[0] if names else None
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def configure_tracing(service: str, role: str) -> bool:
    """Install the SDK's tracer provider and the psycopg instrumentation when the environment
    asks for it (see the module doc); True when tracing is on. Idempotent per process."""
    global ENABLED, _SERVICE
    if ENABLED:
        return True
    exporter_name = requested_exporter()
    if exporter_name is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"service.namespace": "saga", "saga.process": role}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler())
    provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name)))
    trace.set_tracer_provider(provider)
    _instrument_libraries()
    ENABLED, _SERVICE = True, service
    log.info("tracing on: %s exporter, service %s (%s)", exporter_name, service, role)
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; using otlp", name)
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %s is not installed; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, ...


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    instrumentor = PsycopgInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # Connections made from now on (pools fill after this) trace their queries.
        instrumentor.instrument(skip_dep_check=True)


def enable_for_tests(provider: TracerProvider) -> None:
    """Tests: trace into `provider` (e.g. with an InMemorySpanExporter) from now on."""
    global ENABLED
    from opentelemetry import trace

    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)  # once per process: the API refuses a second one
    _instrument_libraries()
    ENABLED = True


def disable_for_tests() -> None:
    global ENABLED
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    PsycopgInstrumentor().uninstrument()
    ENABLED = False


def instrument_app(app: Flask) -> None:
    """HTTP server spans for the app's requests (an incoming `traceparent` is continued)."""
    if not ENABLED:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    excluded = os.environ.get("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "health,ready,metrics")
    FlaskInstrumentor.instrument_app(app, excluded_urls=excluded)


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered (before a short-lived process or a forked job exits)."""
    if not ENABLED:
        return
    from opentelemetry import trace

    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force_flush:
        force_flush(timeout_ms)


# -- the trace context through the outbox ----------------------------------------------------


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span (what an outbox row stores), or None."""
    if not ENABLED:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get(TRACEPARENT)


def _parent(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(INSTRUMENTATION_NAME)


def _messaging(stream: str, operation: str, operation_type: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.destination.name": stream,
        "messaging.destination.template": f"{base_of(stream)}.{{pN}}",
        "messaging.operation": operation,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation_type,
    }
    if (partition := partition_index(stream)) is not None:
        attributes["messaging.destination.partition.id"] = str(partition)
    return attributes


def _event_attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "messaging.message.conversation_id": str(fields.get("correlation_id") or ""),
        "saga.event.id": str(fields.get("event_id") or ""),
        "saga.event.type": str(fields.get("event_type") or ""),
        "saga.event.version": str(fields.get("event_version") or ""),
        "saga.order_id": str(fields.get("aggregate_id") or ""),
    }


@contextmanager
def _span(name: str, kind_name: str, parent: Any, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind

    with _tracer().start_as_current_span(
        name, context=parent, kind=SpanKind[kind_name], attributes=attributes
    ) as span:
        yield span


def consume_span(
    stream: str, group: str, entry_id: str, fields: Mapping[str, Any]
) -> AbstractContextManager[Any]:
    """One CONSUMER span per handled entry, a child of the context its `traceparent` field
    carries; events emitted inside it carry its context. A no-op when tracing is off."""
    if not ENABLED:
        return _NULL
    attributes = {
        **_messaging(stream, "process", "process"),
        "messaging.message.id": entry_id,
        "messaging.consumer.group.name": group,
        **_event_attributes(fields),
    }

    return _span(
        f"process {base_of(stream)}", "CONSUMER", _parent(fields.get(TRACEPARENT)), attributes
    )


def publish_context(
    spans: list[Any], stream: str, traceparent: str | None, event_type: str, order_id: str
) -> dict[str, str]:
    """The relay's trace fields for one outbox row: `{"traceparent": ...}`, or nothing.

    Tracing off: the row's stored context as it is. On: a PRODUCER span, a child of the row's
    context, is started (and appended to `spans`, ended by `end_publish_spans` after the
    pipelined XADD), and the entry carries that span's context."""
    if not ENABLED:
        return {TRACEPARENT: traceparent} if traceparent else {}
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {
        **_messaging(stream, "publish", "send"),
        "saga.event.type": event_type,
        "saga.order_id": order_id,
    }
    span = _tracer().start_span(
        f"publish {base_of(stream)}",
        context=_parent(traceparent),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
    )
    spans.append(span)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier


def end_publish_spans(spans: list[Any], entry_ids: list[Any]) -> None:
    """After the XADDs: each span gets its entry id (none when Redis refused the stream's
    batch as behind, see outbox_relay/positions.py) and ends."""
    for index, span in enumerate(spans):
        if index < len(entry_ids):
            entry_id = entry_ids[index]
            text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            span.set_attribute("messaging.message.id", text)
        span.end()


def job_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """An INTERNAL root span for work not caused by a request or an event (the sweeper)."""
    if not ENABLED:
        return _NULL
    return _span(name, "INTERNAL", None, attributes)


# -- sampling ------------------------------------------------------------------------------------


def sampler() -> Any:
    """The sampler the environment configures (OTEL_TRACES_SAMPLER, default parentbased_
    always_on), except that a CLIENT span without a parent (a database query outside any
    traced work: relay polls, lease heartbeats, an empty read's fence) is not recorded."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        Sampler,
        SamplingResult,
        _get_from_env_or_default,
    )

    class DropOrphanClientSpans(Sampler):
        def __init__(self, delegate: Sampler) -> None:
            self.delegate = delegate

        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind is trace.SpanKind.CLIENT:
                parent = trace.get_current_span(parent_context).get_span_context()
                if not parent.is_valid:
                    return SamplingResult(Decision.DROP)
            return self.delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"DropOrphanClientSpans{{{self.delegate.get_description()}}}"

    return DropOrphanClientSpans(_get_from_env_or_default())
