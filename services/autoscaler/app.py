"""The autoscaler's HTTP layer: `create_app()`, which starts the scaling loop in a background thread,
and its report: `/health` (200 while it can scale, 503 with the reason when it cannot), `/ping`."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from flask import Flask, Response, jsonify

from common.dream_errors import NotReadyError, register_dream_error_handlers
from common.openapi import register_openapi
from services.autoscaler.load import LoadReader
from services.autoscaler.openapi_spec import API
from services.autoscaler.service import Autoscaler
from services.autoscaler.settings import Settings
from services.autoscaler.swarm import Swarm

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, autoscaler: Autoscaler | None = None, *, start: bool = True) -> Flask:
    """The autoscaler's app: the loop runs every AUTOSCALER_INTERVAL_S in a daemon thread (unless
    `start` is False, as tests that call `run_once` themselves ask)."""
    settings = settings or Settings.from_env()
    if autoscaler is None:
        loads = LoadReader(settings.load_timeout_s, settings.api_key)
        autoscaler = Autoscaler(Swarm(settings.docker_host, settings.stack_namespace), loads)
    app = Flask(__name__)
    app.extensions["autoscaler"] = autoscaler
    stop = threading.Event()
    app.extensions["autoscaler_stop"] = stop
    if start:
        threading.Thread(
            target=autoscaler.run_forever, args=(settings.autoscaler_interval_s, stop), name="autoscaler", daemon=True
        ).start()

    @app.get("/health")
    def health() -> tuple[Response, int]:
        body = {
            "status": "failing" if autoscaler.error else "ok",
            "service": settings.service_name,
            "stack": autoscaler.swarm.known_stack,
            "interval_s": settings.autoscaler_interval_s,
            "error": autoscaler.error,
            "services": {name: asdict(status) for name, status in autoscaler.status.items()},
        }
        return jsonify(body), 503 if autoscaler.error else 200

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        if autoscaler.error:
            raise NotReadyError(f"cannot scale: {autoscaler.error}")
        return jsonify("pong")

    register_openapi(app, API)
    register_dream_error_handlers(app, logger)
    return app
