"""What every service's app factory adds with one call, `init_service_layer`: API keys, metrics,
trace ids, the log format and the OpenAPI document.

Request hooks run in this order: the trace context first (so every later line of the request, a
401 included, carries its trace id), then the metrics timer, then the key check. A service's own
routes are guarded by default (common/auth.py): a route added later needs the key unless it is
named public here.

    layer = init_service_layer(app, settings, API, logger=logger)
    layer.outbound_headers()   # Authorization and traceparent for a call to another service
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterable

from flask import Flask

from common import logs, tracing
from common.auth import ApiKeys, init_auth, warn_when_open
from common.metrics import METRICS_ROUTE, ServiceMetrics, init_metrics
from common.openapi import Api, Body, Operation, register_openapi
from common.settings_support import ServiceSettings

METRICS_OPERATION = Operation(
    "GET", METRICS_ROUTE, "Prometheus metrics of this service (text format)",
    responses={200: Body(str, "Prometheus' text exposition format", media_type="text/plain")},
    tags=("monitoring",),
)


@dataclass
class ServiceLayer:
    """What a service's own code needs from the layer: its keys, its metrics registry, its exporter."""

    keys: ApiKeys
    metrics: ServiceMetrics
    export: tracing.OtlpExport | None = None

    def outbound_headers(self) -> dict[str, str]:
        """Headers for a call to another service of the distribution, made while serving a request
        (call it in the request's thread): this service's key and the request's traceparent."""
        return {**self.keys.outbound_headers(), **tracing.outbound_headers()}


def init_service_layer(
    app: Flask,
    settings: ServiceSettings,
    api: Api,
    *,
    logger: logging.Logger,
    public_routes: Iterable[tuple[str, str]] = (),
) -> ServiceLayer:
    """Add keys, metrics, tracing and /openapi.json to `app`; `public_routes` are (method, rule)
    pairs that need no key beyond GET /health and GET /ping."""
    if settings.log_format != "text":
        logs.configure(settings.log_format)
    export = tracing.otlp_export(settings.otel_exporter_otlp_endpoint, settings.service_name, logger)
    tracing.init_tracing(app, export)
    metrics = ServiceMetrics()
    init_metrics(app, metrics)
    keys = ApiKeys(settings.api_keys)
    init_auth(app, keys, public_routes)
    warn_when_open(logger, keys, settings.service_host, settings.service_port)
    register_openapi(app, dataclasses.replace(api, operations=[*api.operations, METRICS_OPERATION]))
    layer = ServiceLayer(keys, metrics, export)
    app.extensions["service_layer"] = layer
    return layer
