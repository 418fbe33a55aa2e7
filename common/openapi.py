"""Each service's OpenAPI document, built from the pydantic models that validate its requests.

A service lists its operations (`Operation`: method, Flask rule, request model, response types);
`register_openapi(app, api)` serves the document at `GET /openapi.json`. The document is assembled
with apispec (paths, components, OpenAPI 3.1) from pydantic's own JSON schemas, so what the docs
say a request may hold is what the service accepts: one source, never a hand-written JSON file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from flask import Flask, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from common.auth import API_KEY_HEADER, PUBLIC_ROUTES

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
JSON = "application/json"


class DreamErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(description="what is wrong and how to fix it")
    field: str | None = Field(description="the request field at fault (e.g. `configs[0].top_p`), or null")


class DreamError(BaseModel):
    """The error shape of every Dream-compatible endpoint."""

    model_config = ConfigDict(extra="forbid")

    error: DreamErrorDetail


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The error shape of the OpenAI-compatible endpoints (`/v1/...`), as OpenAI answers."""

    model_config = ConfigDict(extra="forbid")

    error: OpenAIErrorDetail


ERROR_DESCRIPTIONS = {
    400: "bad input; the error names the field",
    401: "no API key, or not one of the service's PARLEY_API_KEYS (when it has keys)",
    404: "no such item",
    413: "the request body is over the service's MAX_REQUEST_BYTES",
    429: "too many requests queued; retry after the Retry-After header's seconds",
    500: "a failure of the service's own (logged with its traceback)",
    502: "the upstream LLM failed or is unreachable",
    503: "not ready yet (the model is loading)",
    504: "the upstream LLM did not answer in time",
}


@dataclass(frozen=True)
class Body:
    """A response body: its type (a pydantic model or any type pydantic can describe) and media type."""

    type: Any
    description: str = ""
    media_type: str = JSON


@dataclass(frozen=True)
class Operation:
    """One endpoint: `rule` as Flask writes it (`/api/dialogs/<dialog_id>`), its request and answers."""

    method: str
    rule: str
    summary: str
    responses: dict[int, Body | list[Body]]
    request: Any = None
    errors: tuple[int, ...] = ()
    error_type: type[BaseModel] | None = None  # None: the API's error shape
    description: str = ""
    tags: tuple[str, ...] = ()
    request_example: Any = None


@dataclass(frozen=True)
class Api:
    """A service's API: its operations and the error shape most of them answer with."""

    title: str
    version: str
    description: str
    operations: list[Operation]
    error_type: type[BaseModel] = DreamError
    tags: dict[str, str] = field(default_factory=dict)


def _path(rule: str) -> tuple[str, list[str]]:
    """A Flask rule as an OpenAPI path, and its parameter names: `/a/<int:x>` -> `/a/{x}`, ['x']."""
    names: list[str] = []

    def replace(match: re.Match) -> str:
        names.append(match.group(1))
        return "{" + match.group(1) + "}"

    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>", replace, rule), names


class _Schemas:
    """Pydantic schemas as components: each model once, referred to by `$ref`."""

    def __init__(self, spec: APISpec):
        self.spec = spec
        self.registered: dict[str, dict] = {}

    def schema(self, type_: Any, mode: str) -> dict:
        schema = TypeAdapter(type_).json_schema(ref_template=REF_TEMPLATE, mode=mode)
        for name, definition in schema.pop("$defs", {}).items():
            self._component(name, definition)
        if isinstance(type_, type) and issubclass(type_, BaseModel):
            name = type_.__name__
            self._component(name, schema)
            return {"$ref": REF_TEMPLATE.format(model=name)}
        return schema

    def _component(self, name: str, definition: dict) -> None:
        known = self.registered.get(name)
        if known is None:
            self.registered[name] = definition
            self.spec.components.schema(name, definition)
        elif known != definition:
            raise ValueError(f"two different schemas are both named {name!r}: rename one of the models")


def build_openapi(api: Api) -> dict:
    """The OpenAPI 3.1 document of `api`, as a JSON-ready dict."""
    spec = APISpec(title=api.title, version=api.version, openapi_version=OPENAPI_VERSION,
                   info={"description": api.description})
    for name, description in api.tags.items():
        spec.tag({"name": name, "description": description})
    # Every operation but the public ones needs a key when the service has keys (common/auth.py).
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": API_KEY_HEADER})
    schemas = _Schemas(spec)
    paths: dict[str, dict] = {}
    for operation in api.operations:
        path, parameters = _path(operation.rule)
        entry: dict[str, Any] = {
            "summary": operation.summary,
            "operationId": f"{operation.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path).rstrip('_') or '_root'}",
            "responses": {},
        }
        if operation.description:
            entry["description"] = operation.description
        if operation.tags:
            entry["tags"] = list(operation.tags)
        if parameters:
            entry["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in parameters
            ]
        if operation.request is not None:
            content: dict[str, Any] = {"schema": schemas.schema(operation.request, "validation")}
            if operation.request_example is not None:
                content["example"] = operation.request_example
            entry["requestBody"] = {"required": True, "content": {JSON: content}}
        for status, bodies in operation.responses.items():
            bodies = bodies if isinstance(bodies, list) else [bodies]
            by_media_type: dict[str, list[dict]] = {}
            for body in bodies:
                by_media_type.setdefault(body.media_type, []).append(schemas.schema(body.type, "serialization"))
            entry["responses"][str(status)] = {
                "description": " or ".join(b.description for b in bodies if b.description) or "OK",
                "content": {
                    media_type: {"schema": found[0] if len(found) == 1 else {"anyOf": found}}
                    for media_type, found in by_media_type.items()
                },
            }
        error_schema = schemas.schema(operation.error_type or api.error_type, "serialization")
        errors = operation.errors
        if (operation.method.upper(), operation.rule) not in PUBLIC_ROUTES:
            entry["security"] = [{"bearer": []}, {"apiKey": []}]
            errors = tuple(sorted({*errors, 401}))
        for status in errors:
            entry["responses"][str(status)] = {
                "description": ERROR_DESCRIPTIONS.get(status, "error"),
                "content": {JSON: {"schema": error_schema}},
            }
        paths.setdefault(path, {})[operation.method.lower()] = entry
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def register_openapi(app: Flask, api: Api) -> None:
    """Serve `api`'s OpenAPI document at `GET /openapi.json` (built once, on first request)."""
    document: dict = {}

    @app.get("/openapi.json")
    def openapi_json() -> Response:
        if not document:
            document.update(build_openapi(api))
        return jsonify(document)
