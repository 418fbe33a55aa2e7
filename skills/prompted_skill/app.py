"""The prompted skill's HTTP layer: `create_app()` with thin routes and one error handler."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify

from common.dream_errors import register_dream_error_handlers
from common.service_layer import init_service_layer
from common.validation import parse_body
from skills.prompted_skill.llm_client import LLMClient
from skills.prompted_skill.openapi_spec import API
from skills.prompted_skill.protocol import SkillRequest
from skills.prompted_skill.service import PromptedSkill
from skills.prompted_skill.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, llm_client: LLMClient | None = None) -> Flask:
    """The skill's Flask app; settings come from the environment unless given."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    layer = init_service_layer(app, settings, API, logger=logger)
    skill = PromptedSkill(settings, llm_client, outbound_headers=layer.outbound_headers)
    app.extensions["prompted_skill"] = skill

    @app.post("/respond")
    def respond() -> Response:
        skill_request = parse_body(SkillRequest)
        replies = skill.respond(skill_request.dialogs)
        return jsonify([reply.to_dream() for reply in replies])

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", "service": settings.service_name, "llm_endpoints": skill._allowed_urls})

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        return jsonify("pong")

    register_dream_error_handlers(app, logger)
    return app
