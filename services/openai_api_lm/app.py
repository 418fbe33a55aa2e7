"""The OpenAI-API LLM service's HTTP layer: `create_app()` with thin routes and one place for errors.

Errors are Dream's shape, `{"error": {"message", "field"}}`: 400 for bad input (naming the
field), 413 for a body over MAX_REQUEST_BYTES, 502 when the upstream is unreachable or answers
an error or nonsense, 504 when it does not answer within GENERATIVE_TIMEOUT, 500 for a failure
of ours (logged with its traceback).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request

from common.dream_errors import dream_error, register_dream_error_handlers
from common.metrics import LLMMetrics
from common.service_layer import init_service_layer
from common.validation import RequestValidationError, parse_json, read_json_body
from services.openai_api_lm.openapi_spec import API
from services.openai_api_lm.protocol import ChatRenderRequest, OpenAIGenerateGoalsRequest, OpenAIRespondRequest, parse_with_keys
from services.openai_api_lm.service import OpenAIApiLM
from services.openai_api_lm.settings import Settings
from services.openai_api_lm.upstream import ChatCompletionsClient, UpstreamError, UpstreamTimeoutError

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, client: ChatCompletionsClient | None = None) -> Flask:
    """The service's Flask app; settings come from the environment unless given."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    layer = init_service_layer(app, settings, API, logger=logger)
    lm = OpenAIApiLM(settings, client, metrics=LLMMetrics(layer.metrics, settings.pretrained_model_name_or_path))
    app.extensions["openai_api_lm"] = lm
    key_fields = ("openai_api_keys", settings.request_key_field, f"{settings.openai_api_key_env_var}_list")
    logger.info(
        "%s forwards to %s (model %s); API key from %s: %s; per-request keys %s",
        settings.service_name,
        settings.chat_completions_url,
        settings.pretrained_model_name_or_path,
        settings.openai_api_key_env_var,
        "set" if settings.api_key else "not set, requests go without Authorization",
        "allowed" if settings.allow_request_api_keys else "ignored",
    )

    @app.post("/respond")
    def respond() -> Response:
        respond_request, keys = parse_with_keys(OpenAIRespondRequest, read_json_body(), key_fields)
        return jsonify(lm.respond(respond_request.items(), keys))

    @app.post("/render")
    def render() -> Response:
        """What /respond would send the upstream for each dialog, without sending it; keys are never echoed."""
        render_request, _keys = parse_with_keys(OpenAIRespondRequest, read_json_body(), key_fields)
        return jsonify({"model": settings.pretrained_model_name_or_path, "rendered": lm.render(render_request.items())})

    @app.post("/v1/render")
    def v1_render() -> Response:
        """What an OpenAI chat body would be sent upstream as (this service's default config under its parameters)."""
        chat = parse_json(ChatRenderRequest, read_json_body())
        return jsonify(lm.render_chat([m.model_dump() for m in chat.messages], chat.config_override()))

    @app.post("/generate_goals")
    def generate_goals() -> Response:
        goals_request, keys = parse_with_keys(OpenAIGenerateGoalsRequest, read_json_body(), key_fields)
        return jsonify(lm.generate_goals(goals_request.items(), keys))

    @app.get("/health")
    def health() -> Response:
        return jsonify(
            {
                "status": "ok",
                "service": settings.service_name,
                "model": settings.pretrained_model_name_or_path,
                "upstream": settings.openai_base_url,
                "api_key": "set" if settings.api_key else "not set",
            }
        )

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        return jsonify("pong")

    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(UpstreamTimeoutError)
    def upstream_timeout(error: UpstreamTimeoutError):
        logger.warning("504 for %s: %s", request.path, error)
        return dream_error(504, str(error))

    @app.errorhandler(UpstreamError)
    def upstream_failed(error: UpstreamError):
        # The upstream's failure, not ours: no traceback; the message has the key cut out.
        logger.warning("502 for %s: %s", request.path, error)
        return dream_error(502, str(error))

    register_dream_error_handlers(app, logger)

    @app.errorhandler(RequestValidationError)
    def bad_request(error: RequestValidationError):
        if request.path.startswith("/v1/"):  # OpenAI's shape on OpenAI's paths
            body = {"error": {"message": error.message, "type": "invalid_request_error", "param": error.field, "code": None}}
            return jsonify(body), error.status
        return dream_error(error.status, error.message, error.field)
