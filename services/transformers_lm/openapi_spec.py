"""The LLM service's API as OpenAPI operations (served at `/openapi.json` by `common.openapi`):
Dream's endpoints with Dream's error shape, OpenAI's `/v1` endpoints with OpenAI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from common.lm_protocol import GenerateGoalsResponse, RespondResponse
from common.openapi import Api, Body, Operation, OpenAIError
from common.lm_protocol import GenerationConfig
from services.transformers_lm.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateGoalsRequest,
    RenderRequest,
    RespondRequest,
    TokenizeRequest,
)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class LMHealth(BaseModel):
    status: str = Field(description="ok; loading, failed or draining (503)")
    service: str
    model: str
    ongoing_requests: int = Field(description="requests received and not yet answered (what the autoscaler reads)")
    error: str | None = None
    backend: str | None = None
    model_code: str | None = None
    device: str | None = None
    dtype: str | None = None
    context_length: int | None = None
    max_batch_size: int | None = None
    prompt_style: str | None = None
    names: list[str] | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    model_sha256: str | None = None


class Rendering(BaseModel):
    """What one request would be generated from: nothing is generated."""

    model: str
    prompt: str
    prompt_tokens: int
    token_ids: list[int]
    dropped_turns: int
    stop: list[str]
    stop_token_ids: list[int]
    generation_config: GenerationConfig


class RenderedDialogs(BaseModel):
    model: str
    rendered: list[Rendering]


STREAM = Body(str, "with `stream: true`: server-sent events, `data: {chunk}` lines ending with `data: [DONE]` "
              "(or, when generation fails after the stream began, an `event: error` with OpenAI's error body)",
              media_type="text/event-stream")
DREAM_ERRORS = (400, 413, 429, 503)
OPENAI_ERRORS = (400, 404, 413, 429, 503)

API = Api(
    title="Parley LLM service",
    version="0.1.0",
    description="One LLM behind Dream's /respond and /generate_goals and OpenAI's /v1 API.",
    tags={"dream": "Dream's LLM endpoints", "openai": "OpenAI-compatible endpoints"},
    operations=[
        Operation(
            "POST", "/respond", "Hypotheses for each dialog context (Dream's parallel lists)", tags=("dream",),
            request=RespondRequest,
            request_example={"dialog_contexts": [["What is the capital of France?"]], "prompts": ["Answer briefly."]},
            responses={200: Body(RespondResponse, "for each dialog, its hypotheses")},
            errors=DREAM_ERRORS,
        ),
        Operation(
            "POST", "/generate_goals", "What a bot with each prompt can do", tags=("dream",),
            request=GenerateGoalsRequest, responses={200: Body(GenerateGoalsResponse, "one description per prompt")},
            errors=DREAM_ERRORS,
        ),
        Operation(
            "POST", "/render", "The exact prompt, token count, stops and config /respond would use, per dialog",
            tags=("dream",), request=RenderRequest,
            request_example={"dialog_contexts": [["What is the capital of France?"]], "prompts": ["Answer briefly."]},
            responses={200: Body(RenderedDialogs, "for each dialog, what it would be generated from")},
            errors=(400, 404, 413, 503),
        ),
        Operation("GET", "/v1/models", "The model names this service answers to", tags=("openai",),
                  responses={200: Body(ModelList)}, errors=(503,), error_type=OpenAIError),
        Operation(
            "POST", "/v1/chat/completions", "A chat completion", tags=("openai",),
            request=ChatCompletionRequest,
            responses={200: [Body(ChatCompletion, "the completion"), STREAM]},
            errors=OPENAI_ERRORS, error_type=OpenAIError,
        ),
        Operation(
            "POST", "/v1/render", "The exact prompt, token count, stops and config of a chat completion request",
            tags=("openai",), request=ChatCompletionRequest,
            responses={200: Body(Rendering, "what the request would be generated from")},
            errors=(400, 404, 413, 503), error_type=OpenAIError,
        ),
        Operation(
            "POST", "/v1/completions", "A text completion (the prompt as is, no template)", tags=("openai",),
            request=CompletionRequest,
            responses={200: [Body(TextCompletion, "the completion"), STREAM]},
            errors=OPENAI_ERRORS, error_type=OpenAIError,
        ),
        Operation(
            "POST", "/tokenize", "The token ids a text becomes as a prompt (what usage counts)", tags=("openai",),
            request=TokenizeRequest, request_example={"content": "What is the capital of France?"},
            responses={200: Body(TokenizeResponse)}, errors=(400, 413, 503),
        ),
        Operation("GET", "/health", "200 once the model is loaded and warmed up, 503 before and while the service drains",
                  responses={200: Body(LMHealth, "ready"), 503: Body(LMHealth, "loading, failed, or draining (stopping)")}),
        Operation("GET", "/ping", "Dream's liveness check: \"pong\" once ready, 503 before", responses={200: Body(str)},
                  errors=(503,)),
        Operation("POST", "/ping", "Dream's liveness check: \"pong\" once ready, 503 before", responses={200: Body(str)},
                  errors=(503,)),
    ],
)
