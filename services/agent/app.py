"""The agent's HTTP layer (Dream's agent API): `create_app()` with thin routes and one error handler.

    POST /                  a user's turn -> dialog_id, utt_id, user_id, response, active_skill, ...
    GET  /api/dialogs/<id>  a stored dialog
    GET  /api/user/<id>     the ids of a user's dialogs
    GET  /, /chat           the chat page; GET /api/llms: the LLMs it offers (services/agent/chat_page.py)
    GET  /openapi.json      this API's OpenAPI document (services/agent/openapi_spec.py)
    GET  /metrics           Prometheus metrics (common/metrics.py: HTTP, turns, skills)
    GET  /ping, /health

With PARLEY_API_KEYS set every route needs a key but GET /health, GET /ping and the chat page's
HTML, CSS and script (which ask for the key and hold no data); common/service_layer.py.
"""

from __future__ import annotations

import logging
import socket

from flask import Flask, Response, jsonify

from common.dream_errors import NotReadyError, dream_error, register_dream_error_handlers
from common.metrics import AgentMetrics
from common.service_layer import init_service_layer
from common.validation import RequestTooLargeError, RequestValidationError, read_json_body, validate
from services.agent import chat_page
from services.agent.openapi_spec import API
from services.agent.pipeline import load_pipeline
from services.agent.protocol import COMMANDS, TurnRequest
from services.agent.service import Agent
from services.agent.settings import Settings
from services.agent.store import open_store

logger = logging.getLogger(__name__)
# A turn's attributes are stored and copied for every service; deeper ones are refused at the edge.
MAX_ATTRIBUTE_DEPTH = 32


class NotFound(LookupError):
    pass


def create_app(settings: Settings | None = None) -> Flask:
    """The agent's Flask app; settings come from the environment unless given."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    layer = init_service_layer(app, settings, API, logger=logger, public_routes=chat_page.PUBLIC_ROUTES)
    pipeline = load_pipeline(settings.pipeline_config)
    store = open_store(settings.state_location, pool_size=settings.state_pool_size,
                       connect_timeout=settings.state_connect_timeout, log=logger.info)
    agent = Agent(settings, pipeline, store, metrics=AgentMetrics(layer.metrics), outbound_headers=layer.outbound_headers)
    app.extensions["agent"] = agent
    waited_for: set[str] = set()

    @app.post("/")
    def turn() -> Response:
        turn_request = parse_turn(settings)
        if turn_request.payload.strip() in COMMANDS:
            agent.close_dialog(turn_request.user_id)
            return jsonify({"user_id": turn_request.user_id, "command": turn_request.payload.strip()})
        return jsonify(agent.handle_turn(turn_request).model_dump())

    @app.get("/api/dialogs/<dialog_id>")
    def dialog(dialog_id: str) -> Response:
        found = agent.store.dialog(dialog_id)
        if found is None:
            raise NotFound(f"dialog {dialog_id!r} does not exist")
        return jsonify(found)

    @app.get("/api/user/<user_id>")
    def dialogs_of_user(user_id: str) -> Response:
        return jsonify({"user_id": user_id, "dialog_ids": agent.store.dialog_ids_of(user_id)})

    def waiting_for() -> list[str]:
        """The WAIT_HOSTS entries that do not accept connections yet (once one did, it is not asked again)."""
        waiting = [host for host in settings.wait_hosts if host not in waited_for and not _accepts(host)]
        waited_for.update(h for h in settings.wait_hosts if h not in waiting)
        return waiting

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        """Dream's liveness check, honest: "pong" once ready, as /health says; 503 before."""
        waiting = waiting_for()
        if waiting:
            raise NotReadyError(f"waiting for {', '.join(waiting)} (WAIT_HOSTS) to accept connections")
        return jsonify("pong")

    @app.get("/health")
    def health():
        waiting = waiting_for()
        body = {"status": "ok" if not waiting else "waiting", "service": settings.service_name,
                "pipeline": agent.pipeline.service_names(), "waiting_for": waiting}
        return jsonify(body), 200 if not waiting else 503

    chat_page.init_app(app)
    _register_error_handlers(app)
    return app


def parse_turn(settings: Settings) -> TurnRequest:
    """The turn in the request's body; a RequestValidationError (400, 413) naming the field otherwise."""
    data = read_json_body()
    if not isinstance(data, dict):
        raise RequestValidationError('the request body must be a JSON object, e.g. {"user_id": "me", "payload": "Hi"}')
    for name, value in data.items():
        if nesting_depth(value) > MAX_ATTRIBUTE_DEPTH:
            raise RequestValidationError(f"{name}: nested more than {MAX_ATTRIBUTE_DEPTH} levels deep", name)
    turn_request = validate(TurnRequest, data)
    if len(turn_request.payload) > settings.max_payload_chars:
        raise RequestTooLargeError(f"payload: {len(turn_request.payload)} characters, over the limit of "
                                   f"{settings.max_payload_chars} (MAX_PAYLOAD_CHARS)", "payload")
    return turn_request


def nesting_depth(value) -> int:
    """How many lists and objects deep a JSON value goes (without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _accepts(host_port: str) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(NotFound)
    def not_found(error: NotFound):
        return dream_error(404, str(error))

    register_dream_error_handlers(app, logger, limit_owner="the agent's")
