"""The LLM service's HTTP layer: `create_app()` with thin routes, a background model loader and one error handler.

Nothing happens at import. `create_app` reads the settings and the default generative config, then
loads the model in a background thread (or takes a model handed in, as tests do): `/health` is
503 until the model is loaded and a warm-up generation ran. `/health` also reports the requests in
progress (`ongoing_requests`, what the autoscaler reads); once the service drains (SIGTERM,
common/draining.py) it is 503 `draining` and new requests get 503 while those in progress finish.
Dream endpoints answer errors as `{"error": {"message", "field"}}`, `/v1/*` endpoints in OpenAI's shape.
Keys, metrics (vLLM's, at `/metrics`) and trace ids come from common/service_layer.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.lm_protocol import GenerationConfig, load_default_config
from common.model_sources import ModelSourceError, resolve_model_source
from common.validation import RequestValidationError, parse_body
from common.dream_errors import NotReadyError
from common.draining import DrainingError, install_drain
from common.metrics import LLMMetrics
from common.service_layer import init_service_layer
from common.service_main import stop_worker
from services.transformers_lm import openai_serving
from services.transformers_lm.openapi_spec import API
from services.transformers_lm.backends import BackendRegistry, LoadedModel, LoadOptions, ModelLoadError, default_registry
from services.transformers_lm.engines import QueueFullError
from services.transformers_lm.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateGoalsRequest,
    RenderRequest,
    RespondRequest,
    TokenizeRequest,
    openai_error,
)
from services.transformers_lm.service import GenerationFailedError, LMService
from services.transformers_lm.settings import Settings

logger = logging.getLogger(__name__)



class ModelNotReadyError(NotReadyError):
    """The model is still loading (or failed to load): 503."""


def load_model(settings: Settings, registry: BackendRegistry | None = None) -> LoadedModel:
    """Resolve the model source, pick its backend and load it; raise ModelLoadError with a one-line fix."""
    try:
        source = resolve_model_source(settings.pretrained_model_name_or_path)
    except ModelSourceError as error:
        raise ModelLoadError(str(error)) from None
    backend = (registry or default_registry()).choose(settings.backend, source)
    if settings.half_precision and not backend.supports_half_precision:
        logger.warning("HALF_PRECISION is ignored: the %s backend does not support it", backend.name)
    options = LoadOptions(
        device=settings.device,
        half_precision=settings.half_precision and backend.supports_half_precision,
        cache_dir=settings.model_cache_dir,
        sha256=settings.model_sha256,
        additional_eos_tokens=settings.additional_eos_tokens,
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        threads=settings.threads,
        model_code=settings.model_code,
        context_length=settings.context_length,
        gguf_weights=settings.gguf_weights,
    )
    logger.info("loading %s with the %s backend", settings.pretrained_model_name_or_path, backend.name)
    return backend().load(source, options)


class ServiceHolder:
    """Holds the LMService once its model is loaded and warmed up; `get()` raises 503 before."""

    def __init__(self, settings: Settings, default_config: GenerationConfig, metrics: LLMMetrics | None = None):
        self.settings = settings
        self.default_config = default_config
        self.metrics = metrics
        self.state = "loading"
        self.error: str | None = None
        self.service: LMService | None = None
        self.ready = threading.Event()

    def get(self) -> LMService:
        if self.service is None:
            if self.state == "failed":
                raise ModelNotReadyError(f"the model failed to load: {self.error}")
            raise ModelNotReadyError("the model is still loading; retry when /health answers 200")
        return self.service

    def install(self, model: LoadedModel) -> None:
        service = LMService(model, self.settings, self.default_config, self.metrics)
        started = time.monotonic()
        sample = service.warm_up()
        logger.info("warm-up generation done in %.1f s (%r)", time.monotonic() - started, sample)
        self.service = service
        self.state = "ready"
        self.ready.set()

    def load_in_background(self, load: Callable[[], LoadedModel], on_failure: Callable[[str], None]) -> None:
        def run() -> None:
            try:
                self.install(load())
            except ModelLoadError as error:
                self._fail(str(error), on_failure)
            except Exception as error:  # noqa: BLE001 - any failure to start is reported the same way
                logger.exception("loading the model failed")
                self._fail(f"{type(error).__name__}: {error}", on_failure)

        threading.Thread(target=run, name="model-loader", daemon=True).start()

    def _fail(self, message: str, on_failure: Callable[[str], None]) -> None:
        self.state, self.error = "failed", message
        self.ready.set()
        on_failure(message)


def exit_worker(message: str) -> None:
    """Stop the process: the service cannot serve without its model (gunicorn then stops too)."""
    stop_worker(logger, message)


def create_app(
    settings: Settings | None = None,
    model: LoadedModel | None = None,
    *,
    registry: BackendRegistry | None = None,
    on_load_failure: Callable[[str], None] = exit_worker,
) -> Flask:
    """The service's Flask app. With `model` given it serves that model at once; else it loads the
    model from the settings in a background thread and calls `on_load_failure` if that fails."""
    settings = settings or Settings.from_env()
    default_config = load_default_config(settings.generative_config, settings.caps)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    layer = init_service_layer(app, settings, API, logger=logger)
    holder = ServiceHolder(settings, default_config, LLMMetrics(layer.metrics, settings.served_model_names[0]))
    app.extensions["lm_service"] = holder
    drain = install_drain(app)
    started_at = int(time.time())
    if model is not None:
        holder.install(model)
    else:
        holder.load_in_background(lambda: load_model(settings, registry), on_load_failure)

    @app.post("/respond")
    def respond() -> Response:
        respond_request = parse_body(RespondRequest)
        return jsonify(holder.get().respond(respond_request.items()))

    @app.post("/render")
    def render() -> Response:
        """What /respond would generate from, per dialog: the prompt text, its tokens, stops and config."""
        render_request = parse_body(RenderRequest)
        service = holder.get()
        served = service.served(render_request.model)
        jobs = service.dream_jobs(render_request.items(), served)
        return jsonify({"model": served.name, "rendered": [service.rendering(served, p, c) for p, c in jobs]})

    @app.post("/generate_goals")
    def generate_goals() -> Response:
        goals_request = parse_body(GenerateGoalsRequest)
        return jsonify(holder.get().generate_goals(goals_request.items()))

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        """Dream's liveness check, honest: "pong" once the model serves, 503 while it loads, after it
        failed, or while it drains."""
        holder.get()
        if drain.draining:
            raise DrainingError()
        return jsonify("pong")

    @app.get("/health")
    def health() -> tuple[Response, int]:
        body = {"status": holder.state, "service": settings.service_name, "model": settings.pretrained_model_name_or_path,
                "ongoing_requests": drain.ongoing}
        if holder.service is None:
            return jsonify({**body, "error": holder.error}), 503
        if drain.draining:
            return jsonify({**body, "status": "draining"}), 503
        service = holder.service
        info = service.model.info
        return jsonify(
            {
                **body,
                "status": "ok",
                "backend": info.backend,
                "model_code": info.model_code,
                "device": info.device,
                "dtype": info.dtype,
                "context_length": info.context_length,
                "max_batch_size": settings.max_batch_size,
                "prompt_style": service.renderer.name,
                "names": list(service.names),
                "stop": list(service.default.prompt_builder.stop_sequences),
                "stop_token_ids": list(service.default.prompt_builder.stop_token_ids),
                "model_sha256": settings.model_sha256,
            }
        ), 200

    @app.post("/tokenize")
    def tokenize() -> Response:
        """The ids a text becomes as a prompt (special tokens as the model adds them): what usage counts."""
        tokenize_request = parse_body(TokenizeRequest)
        token_ids = holder.get().model.encode(tokenize_request.text)
        return jsonify({"tokens": token_ids, "count": len(token_ids)})

    @app.get("/v1/models")
    def v1_models() -> Response:
        return jsonify(openai_serving.list_models(holder.get(), started_at))

    @app.post("/v1/chat/completions")
    def v1_chat_completions() -> Response:
        chat_request = parse_body(ChatCompletionRequest)
        return _openai_result(openai_serving.chat_completion(holder.get(), chat_request))

    @app.post("/v1/render")
    def v1_render() -> Response:
        """What /v1/chat/completions would generate from for this body, without generating."""
        chat_request = parse_body(ChatCompletionRequest)
        return jsonify(openai_serving.chat_rendering(holder.get(), chat_request))

    @app.post("/v1/completions")
    def v1_completions() -> Response:
        completion_request = parse_body(CompletionRequest)
        return _openai_result(openai_serving.completion(holder.get(), completion_request))

    _register_error_handler(app)
    return app


def _openai_result(result) -> Response:
    if isinstance(result, dict):
        return jsonify(result)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(result, mimetype="text/event-stream", headers=headers)


# Status, OpenAI error type and code for each error class; the first match wins.
_ERROR_STATUSES: list[tuple[type[BaseException], int, str, str | None]] = [
    (RequestValidationError, 400, "invalid_request_error", None),
    (openai_serving.ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (RequestEntityTooLarge, 413, "invalid_request_error", "request_too_large"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (ModelNotReadyError, 503, "service_unavailable", "model_not_ready"),
    (DrainingError, 503, "service_unavailable", "draining"),
]


def _register_error_handler(app: Flask) -> None:
    @app.errorhandler(Exception)
    def handle_error(error: Exception):
        status, error_type, code, field = 500, "server_error", None, None
        message = "generation failed; the service log has the details"
        for error_class, error_status, error_type_name, error_code in _ERROR_STATUSES:
            if isinstance(error, error_class):
                status, error_type = error_status, error_type_name
                own_code = getattr(error, "code", None)  # e.g. context_length_exceeded (an HTTPException's is its status)
                code = own_code if isinstance(own_code, str) else error_code
                message = getattr(error, "message", None) or str(error)
                field = getattr(error, "field", None)
                break
        else:
            if isinstance(error, HTTPException):
                status, error_type = error.code or 500, "invalid_request_error"
                message = error.description or error.name
        if isinstance(error, RequestEntityTooLarge):
            message = (
                f"the request body is over this service's limit of {app.config['MAX_CONTENT_LENGTH']} bytes "
                "(MAX_REQUEST_BYTES)"
            )
            field = None
        if status >= 500 and not isinstance(error, NotReadyError):
            logger.error("%s %s failed: %r", request.method, request.path, error, exc_info=error)
            if not isinstance(error, (GenerationFailedError, HTTPException)):
                message = f"internal error ({type(error).__name__}); the service log has the details"
        if request.path.startswith("/v1/"):
            body = openai_error(message, error_type, field, code)
        else:
            body = {"error": {"message": message, "field": field}}
        response = jsonify(body)
        response.status_code = status
        if isinstance(error, QueueFullError):
            response.headers["Retry-After"] = str(max(1, round(error.retry_after_seconds)))
        return response
