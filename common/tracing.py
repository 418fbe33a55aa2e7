"""One trace id per request, from the agent to the LLM: W3C Trace Context (`traceparent`).

Each request a service serves gets a `TraceContext`: the caller's trace id when it sent a valid
`traceparent` header, a new random one otherwise (so the agent makes the id of a turn whose caller
sent none), and a new span id for this service's part of it. The context lives in a contextvar for
the request's thread, where three readers find it:

- the log filter (`common/logs.py`) writes its trace id on every log line of the request;
- `outbound_headers()` gives the services a request calls `traceparent: 00-<trace>-<this span>-<flags>`;
- the response carries `traceparent` and `X-Trace-Id` back to the caller.

Work handed to a thread pool must take the context along (`submit_in_context`): a pool's threads do
not inherit the submitting thread's contextvars.

When OTEL_EXPORTER_OTLP_ENDPOINT is set and the opentelemetry SDK and its OTLP/HTTP exporter are
installed, each request is also a server span exported there (`OtlpExport`); its span id is the one
logged and sent on, so the exported trace and the logs agree. Without those packages nothing is
exported and a warning says why: they are not a dependency.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping

TRACEPARENT_HEADER = "traceparent"
TRACE_ID_HEADER = "X-Trace-Id"
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """This service's part of a trace: the trace id, its own span id, and the parent span it came from."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = True

    def traceparent(self) -> str:
        """The header a callee gets: this span is its parent."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


@dataclass(frozen=True)
class Parent:
    """What a valid incoming `traceparent` says."""

    trace_id: str
    span_id: str
    sampled: bool


def parse_traceparent(value: str | None) -> Parent | None:
    """A W3C `traceparent` header, or None when it is absent or invalid (then a new trace starts)."""
    match = _TRACEPARENT.match((value or "").strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or (version == "00" and len(value.strip()) != 55):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1))


def new_trace_id() -> str:
    return secrets.token_hex(16)


def new_span_id() -> str:
    return secrets.token_hex(8)


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("parley_trace", default=None)


def current() -> TraceContext | None:
    return _current.get()


def current_trace_id() -> str | None:
    context = _current.get()
    return context.trace_id if context is not None else None


def set_current(context: TraceContext | None) -> None:
    """Make `context` the current request's (the request hook does; so may a test)."""
    _current.set(context)


def context_for(headers: Mapping[str, str], span_id: str | None = None) -> TraceContext:
    """The trace context of a request with these headers: the caller's trace, or a new one."""
    parent = parse_traceparent(headers.get(TRACEPARENT_HEADER))
    span_id = span_id or new_span_id()
    if parent is None:
        return TraceContext(new_trace_id(), span_id)
    return TraceContext(parent.trace_id, span_id, parent.span_id, parent.sampled)


def outbound_headers() -> dict[str, str]:
    """`traceparent` for a call made while serving a request (nothing outside one)."""
    context = _current.get()
    return {TRACEPARENT_HEADER: context.traceparent()} if context is not None else {}


def submit_in_context(pool: Executor, function: Callable[..., Any], *args: Any) -> Future:
    """`pool.submit(function, *args)`, run in a copy of this thread's context (its trace id with it)."""
    return pool.submit(contextvars.copy_context().run, function, *args)


class OtlpExport:
    """A server span per request, exported over OTLP/HTTP; built only when opentelemetry is installed."""

    def __init__(self, endpoint: str, service_name: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
        self.tracer = self.provider.get_tracer("parley")

    def start(self, name: str, headers: Mapping[str, str]) -> tuple[Any, TraceContext]:
        """A started span for a request, and the trace context that carries its ids."""
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        parent = parse_traceparent(headers.get(TRACEPARENT_HEADER))
        parent_context = None
        if parent is not None:
            remote = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED if parent.sampled else TraceFlags.DEFAULT))
            parent_context = trace.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=parent_context, kind=SpanKind.SERVER)
        ids = span.get_span_context()
        context = TraceContext(f"{ids.trace_id:032x}", f"{ids.span_id:016x}",
                               parent.span_id if parent else None, parent.sampled if parent else True)
        return span, context

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_export(endpoint: str | None, service_name: str, logger: logging.Logger) -> OtlpExport | None:
    """The exporter for OTEL_EXPORTER_OTLP_ENDPOINT, or None (unset, or the packages are missing: a warning)."""
    if not endpoint:
        return None
    try:
        export = OtlpExport(endpoint, service_name)
    except ImportError:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http "
            "are not installed: no spans are exported (trace ids are still logged and sent on)"
        )
        return None
    logger.info("exporting a span per request to %s (OTLP/HTTP)", endpoint)
    return export


def init_tracing(app, export: OtlpExport | None = None) -> None:
    """Give each request of `app` its trace context (first of its request hooks, so every later hook
    and log line has it) and send the ids back in `traceparent` and `X-Trace-Id`."""
    from flask import g, request

    @app.before_request
    def start_trace() -> None:
        if export is not None:
            rule = request.url_rule.rule if request.url_rule is not None else request.path
            g.parley_span, context = export.start(f"{request.method} {rule}", request.headers)
        else:
            context = context_for(request.headers)
        set_current(context)

    @app.after_request
    def answer_trace(response):
        context = current()
        if context is not None:
            response.headers[TRACEPARENT_HEADER] = context.traceparent()
            response.headers[TRACE_ID_HEADER] = context.trace_id
        span = g.pop("parley_span", None)
        if span is not None:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("http.response.status_code", response.status_code)
            span.end()
        return response
