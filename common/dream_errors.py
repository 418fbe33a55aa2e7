"""Dream's JSON error shape, and the error handlers every Dream-compatible service shares.

Each service registers its own typed errors (502/504 from an upstream, 404, ...);
`register_dream_error_handlers` adds what they all answer alike: bad input
(`RequestValidationError`: 400 naming the field, or 413 for its size subclass), 503 while not ready
(`NotReadyError`, e.g. from an honest `/ping`), 413 for a body over
MAX_REQUEST_BYTES, werkzeug's HTTP errors in the same shape, and a logged 500 for anything else.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.validation import RequestValidationError


class NotReadyError(RuntimeError):
    """The service cannot answer yet (a model loading, a service it waits for): 503."""


def dream_error(status: int, message: str, field: str | None = None) -> tuple[Response, int]:
    """`{"error": {"message", "field"}}` with `status`."""
    return jsonify({"error": {"message": message, "field": field}}), status


def register_dream_error_handlers(app: Flask, logger: logging.Logger, *, limit_owner: str = "this service's") -> None:
    """Bad input, 413, other HTTP errors and unexpected exceptions (logged with their traceback) in Dream's shape."""

    @app.errorhandler(RequestValidationError)
    def bad_request(error: RequestValidationError):
        return dream_error(error.status, error.message, error.field)

    @app.errorhandler(NotReadyError)
    def not_ready(error: NotReadyError):
        return dream_error(503, str(error))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return dream_error(413, f"the request body is over {limit_owner} limit of {limit} bytes (MAX_REQUEST_BYTES)")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return dream_error(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        logger.exception("internal error answering %s %s", request.method, request.path)
        return dream_error(500, f"internal error: {type(error).__name__}")
