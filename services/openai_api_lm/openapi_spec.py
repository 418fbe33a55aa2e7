"""The OpenAI-API LLM service's API as OpenAPI operations (served at `/openapi.json` by `common.openapi`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from typing import Any

from common.lm_protocol import GenerateGoalsResponse, RespondResponse
from common.openapi import Api, Body, OpenAIError, Operation
from services.openai_api_lm.protocol import ChatRenderRequest, OpenAIGenerateGoalsRequest, OpenAIGenerationConfig, OpenAIRespondRequest


class _RequestKeyFields(BaseModel):
    """Dream's per-request key fields: taken out before the request is validated, used only with
    ALLOW_REQUEST_API_KEYS=1. (A key variable other than OPENAI_API_KEY adds `<its name, lower case>s`.)"""

    openai_api_keys: list[str | None] | None = Field(None, description="one key, or one per dialog")
    openai_api_organizations: list[str | None] | None = Field(None, description="one organization, or one per dialog")
    openai_organizations: list[str | None] | None = Field(None, description="the same, Dream's other name")


class RespondRequestWithKeys(OpenAIRespondRequest, _RequestKeyFields):
    """`POST /respond` as documented: the shared request plus the key fields."""


class GenerateGoalsRequestWithKeys(OpenAIGenerateGoalsRequest, _RequestKeyFields):
    """`POST /generate_goals` as documented: the shared request plus the key fields."""


class UpstreamHealth(BaseModel):
    status: str
    service: str
    model: str
    upstream: str
    api_key: str


class UpstreamRendering(BaseModel):
    """What would be sent upstream for one dialog (never a key: that travels in a header)."""

    model: str
    upstream: str
    request: dict[str, Any]
    prompt_tokens: None = Field(description="null: the upstream tokenizes; its answer's usage.prompt_tokens counts them")
    prompt_tokens_note: str
    stop: list[str]
    generation_config: OpenAIGenerationConfig


class UpstreamRenderings(BaseModel):
    model: str
    rendered: list[UpstreamRendering]


ERRORS = (400, 413, 502, 504)

API = Api(
    title="Parley OpenAI-API LLM service",
    version="0.1.0",
    description="Dream's /respond and /generate_goals over an OpenAI-compatible upstream (one chat completion per dialog).",
    operations=[
        Operation(
            "POST", "/respond", "Hypotheses for each dialog context (Dream's parallel lists)",
            request=RespondRequestWithKeys,
            request_example={"dialog_contexts": [["What is the capital of France?"]], "prompts": ["Answer briefly."]},
            responses={200: Body(RespondResponse, "for each dialog, its hypotheses")},
            errors=ERRORS,
        ),
        Operation("POST", "/generate_goals", "What a bot with each prompt can do", request=GenerateGoalsRequestWithKeys,
                  responses={200: Body(GenerateGoalsResponse, "one description per prompt")}, errors=ERRORS),
        Operation(
            "POST", "/render", "What /respond would send the upstream for each dialog, without sending it",
            request=RespondRequestWithKeys, responses={200: Body(UpstreamRenderings)}, errors=(400, 413),
        ),
        Operation(
            "POST", "/v1/render", "What an OpenAI chat body would be sent upstream as, without sending it",
            request=ChatRenderRequest, responses={200: Body(UpstreamRendering)}, errors=(400, 413), error_type=OpenAIError,
        ),
        Operation("GET", "/health", "Ready (the upstream is asked only per request)", responses={200: Body(UpstreamHealth)}),
        Operation("GET", "/ping", "Dream's liveness check: \"pong\" (ready once started: nothing to load)",
                  responses={200: Body(str)}),
        Operation("POST", "/ping", "Dream's liveness check: \"pong\" (ready once started: nothing to load)",
                  responses={200: Body(str)}),
    ],
)
