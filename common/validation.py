"""Validation plumbing shared by every service and the CLI: pydantic errors as messages, request
bodies parsed into models, and the errors that stop a service from starting.

Turning a pydantic `ValidationError` into words (one formatter for everyone):

    problems(error)              -> [Problem(location, field, message), ...], one per complaint
    error_lines(error, root=...) -> ["field: message", ...]      what a CLI prints, one per line
    request_error(error)         -> RequestValidationError      the first complaint, for an API's 400
    validate(Model, data)        -> Model, or that RequestValidationError

Each takes `prefix` (put before every field) and `model` (the class validated: lets the message for
an unknown key list the keys allowed there).

A `Problem` has the pydantic location, its `field` path as clients write it (`configs[0].top_p`:
list indexes in brackets, union member tags left out) and a `message` with pydantic's
"Value error, " prefix removed, "this field is required" for a missing field, and, for an unknown
key, the keys the model at that place accepts (a model may widen them with an `allowed_keys()`
classmethod, e.g. to accept OpenAI's names too). A cross-field check of ours raises
`RequestValidationError` inside a validator: its own message and field are kept, the field made
relative to the request.

Reading a request (one body parser for every Flask service):

    read_json_body()           -> the body as JSON, or RequestValidationError (400)
    parse_json(Model, data)    -> Model, or RequestValidationError naming the field (400)
    parse_body(Model)          -> both at once

Starting a service: every error that means "this service cannot start" is a `StartupError`
(settings that cannot be used, a model that cannot load, a pipeline the agent cannot run);
`common.service_main.app_or_exit` logs its one-line message and stops gunicorn without a traceback.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class StartupError(Exception):
    """The service cannot start; the message is one line that says how to fix it."""


class RequestValidationError(ValueError):
    """Bad input from a client: `message` says what is wrong, `field` where (e.g. `configs[0].top_p`).

    `status` is the HTTP status a service answers with: 400, or 413 for a subclass about size.
    """

    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class RequestTooLargeError(RequestValidationError):
    """Input over a size limit of the service (413)."""

    status = 413


# Parts of a pydantic error location that name a union's member type, not a field:
# ('messages', 0, 'content', 'str') is the field messages[0].content.
_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "bytes", "none", "function-after", "function-before"}


def field_path(location: Iterable[Any]) -> str | None:
    """A pydantic error location as a field path: ('configs', 0, 'top_p') -> 'configs[0].top_p'."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part) in _UNION_MEMBER_TAGS or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _join(prefix: str, path: str | None) -> str | None:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


@dataclass(frozen=True)
class Problem:
    """One complaint of pydantic, in words: where (`field`, None for the whole input) and what."""

    location: tuple[Any, ...]
    field: str | None
    message: str

    def line(self, root: str = "(input)") -> str:
        """`field: message`; `root` stands for the field when the problem is the input as a whole."""
        return f"{self.field or root}: {self.message}"


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is not None or isinstance(annotation, types.UnionType):
        for argument in typing.get_args(annotation):
            found.extend(_model_classes(argument))
    return found


def _model_at(model: type[BaseModel] | None, location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the last part of `location`, found by walking `model`'s fields."""
    current = model
    for part in location:
        if current is None:
            return None
        if not isinstance(part, str) or part not in current.model_fields:
            continue  # a list index, a dict key, a union tag: same model below
        candidates = _model_classes(current.model_fields[part].annotation)
        if not candidates:
            return current if part == location[-1] else None
        current = candidates[0]
    return current


def _allowed_keys(model: type[BaseModel] | None, location: tuple[Any, ...]) -> list[str]:
    holder = _model_at(model, location[:-1])
    if holder is None:
        return []
    custom = getattr(holder, "allowed_keys", None)
    return list(custom()) if callable(custom) else sorted(holder.model_fields)


def problems(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[Problem]:
    """Every complaint of `error` in words. `prefix` goes before each field (`lm_service_config`);
    `model`, the class that was validated, lets an unknown key's message list the allowed ones."""
    found = []
    for item in error.errors(include_url=False, include_input=False):
        location = tuple(item["loc"])
        nested = field_path(location)
        original = (item.get("ctx") or {}).get("error")
        if isinstance(original, RequestValidationError):
            # A cross-field check of ours: it knows its field, relative to the model that raised it.
            field = ".".join(part for part in (prefix, nested, original.field) if part) or None
            found.append(Problem(location, field, original.message))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "this field is required"
        elif item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, location)
            message = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        found.append(Problem(location, _join(prefix, nested), message))
    return found


def error_lines(
    error: ValidationError, root: str = "(input)", prefix: str = "", model: type[BaseModel] | None = None
) -> list[str]:
    """One `field: message` line per complaint, as a command line prints them."""
    return [problem.line(root) for problem in problems(error, prefix, model)]


def request_error(
    error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> RequestValidationError:
    """The first complaint as one RequestValidationError: `field: message`, with its field."""
    first = problems(error, prefix, model)[0]
    original = (error.errors(include_url=False)[0].get("ctx") or {}).get("error")
    if isinstance(original, RequestValidationError):
        return type(original)(first.message, first.field)
    return RequestValidationError(first.line() if first.field else first.message, first.field)


def validate(model: type[Model], data: Any, prefix: str = "") -> Model:
    """`model.model_validate(data)`, a failure raised as RequestValidationError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise request_error(error, prefix, model) from None


def read_json_body() -> Any:
    """The Flask request's body parsed as JSON; RequestValidationError when it cannot be."""
    from flask import request  # here, so the CLI can use this module without a request context

    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestValidationError(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise RequestValidationError("the request body is JSON nested too deeply to read") from None


def parse_json(model: type[Model], data: Any) -> Model:
    """Decoded JSON validated into `model`, which takes a JSON object; bad input raises RequestValidationError."""
    if not isinstance(data, dict):
        raise RequestValidationError("the request body must be a JSON object")
    return validate(model, data)


def parse_body(model: type[Model]) -> Model:
    """The Flask request's JSON body validated into `model`."""
    return parse_json(model, read_json_body())
