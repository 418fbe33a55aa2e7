"""Wire models of the LLM service: Dream's (from `common.lm_protocol`) and OpenAI's `/v1` requests.

OpenAI fields follow the order of OpenAI's API reference; a request converts itself into a
generation config (`generation_override`), so the HTTP layer never maps parameters by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.lm_protocol import GenerateGoalsRequest, RespondRequest  # noqa: F401 - re-exported: the Dream wire models
from common.validation import RequestValidationError

# OpenAI's parameter names for our generation keys, to name the right field in errors.
OPENAI_PARAM_FOR_KEY = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}


def openai_error(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`: the answer of every
    `/v1` failure, and the last event of a stream that fails after it started."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """One message of a chat completion request; text content only."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Parameters that chat completions and completions share. Unknown parameters are ignored, as
    OpenAI-compatible servers do, so clients that send extra options keep working."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generation_override(self) -> dict:
        """The generation keys this request sets, to merge over the model's default config.

        OpenAI has no minimum length, so min_new_tokens is 0 whatever the default config says; nor
        beam search or Dream's replacement pairs, so a default config's num_beams and replacement
        do not apply here.
        """
        override: dict = {"min_new_tokens": 0, "num_return_sequences": self.n, "num_beams": 1, "replacement": []}
        if self.requested_max_tokens is not None:
            override["max_new_tokens"] = self.requested_max_tokens
        if self.temperature is not None:
            override["temperature"] = self.temperature
            override["do_sample"] = self.temperature > 0
        if self.top_p is not None:
            override["top_p"] = self.top_p
        if self.seed is not None:
            override["seed"] = self.seed
        if self.frequency_penalty is not None:
            override["frequency_penalty"] = float(self.frequency_penalty)
        if self.presence_penalty is not None:
            override["presence_penalty"] = float(self.presence_penalty)
        if self.stop is not None:
            override["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return override


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _has_a_turn(self) -> "ChatCompletionRequest":
        if not any(m.role in ("user", "assistant") for m in self.messages):
            raise RequestValidationError("messages need at least one user message", "messages")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`: the prompt is used as is, without any template."""

    prompt: str | list[str]
    echo: bool = False

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        if self.echo:
            raise RequestValidationError("echo is not supported", "echo")
        prompts = self.prompts
        if not prompts or any(not p for p in prompts):
            raise RequestValidationError("prompt must be a non-empty string or a list of them", "prompt")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
