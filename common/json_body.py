"""The request's body as JSON, for every service: one place that knows how parsing can fail."""

from __future__ import annotations

import json

from flask import request

from common.lm_protocol import RequestValidationError


class InvalidJsonBody(RequestValidationError):
    """The body is not JSON (or nested past what the parser takes); the message says which.
    Services whose handlers answer RequestValidationError with a 400 need not catch it."""

    def __init__(self, message: str):
        super().__init__(message, None)


def read_json_body() -> object:
    """The request body parsed as JSON; InvalidJsonBody when it cannot be."""
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidJsonBody(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidJsonBody("the request body is JSON nested too deeply to read") from None
