"""Wire models of the LLM service: Dream's (from `common.lm_protocol`) and OpenAI's `/v1` requests.

OpenAI fields follow the order of OpenAI's API reference; a request converts itself into a
generation config (`generation_override`), so the HTTP layer never maps parameters by hand.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.lm_protocol import GenerateGoalsRequest, ResponseFormat, RespondRequest  # noqa: F401 - re-exported
from common.validation import RequestValidationError
from services.transformers_lm.backends import ChatMessage, ChatToolCall
from services.transformers_lm.structured_output import ToolChoice, ToolFunction

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


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(BaseModel):
    """A call an assistant message of the history made."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    """One message of a chat completion request; text content only. An assistant message may carry
    `tool_calls` (and no content), a `tool` message answers the call `tool_call_id` names."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessageIn":
        if self.role == "tool" and not self.tool_call_id:
            raise RequestValidationError(
                "a message with role tool needs tool_call_id, the id of the call it answers", "tool_call_id"
            )
        if self.tool_calls and self.role != "assistant":
            raise RequestValidationError("only assistant messages carry tool_calls", "tool_calls")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_chat_message(self) -> ChatMessage:
        calls = tuple(ChatToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(self.role, self.text, calls, self.tool_call_id)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """A tool the model may call: a function, as OpenAI's `tools[i]`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call exactly this tool."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


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
    min_tokens: int = Field(0, ge=0)  # vLLM's extra: end tokens are held back until this many were generated
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
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

    @model_validator(mode="after")
    def _min_tokens_fit_under_max_tokens(self) -> "_SamplingRequest":
        if self.requested_max_tokens is not None and self.min_tokens > self.requested_max_tokens:
            raise RequestValidationError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.requested_max_tokens})", "min_tokens"
            )
        return self

    def generation_override(self) -> dict:
        """The generation keys this request sets, to merge over the model's default config.

        OpenAI has no minimum length, so min_new_tokens is `min_tokens` (vLLM's extra, 0 unless sent)
        whatever the default config says; nor beam search or Dream's replacement pairs, so a default
        config's num_beams and replacement do not apply here.
        """
        override: dict = {"min_new_tokens": self.min_tokens, "num_return_sequences": self.n, "num_beams": 1, "replacement": []}
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
        if self.response_format is not None:
            override["response_format"] = self.response_format
        return override


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _has_a_turn(self) -> "ChatCompletionRequest":
        if not any(m.role in ("user", "assistant", "tool") for m in self.messages):
            raise RequestValidationError("messages need at least one user message", "messages")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        names = [tool.function.name for tool in self.tools or ()]
        if self.tool_choice is not None and not names:
            raise RequestValidationError("tool_choice is only allowed when tools are given", "tool_choice")
        if len(set(names)) != len(names):
            raise RequestValidationError("tools must have different function names", "tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise RequestValidationError(
                f"tool_choice names the function {self.tool_choice.function.name!r}, which is not among the tools "
                f"({', '.join(names)})",
                "tool_choice",
            )
        return self

    @property
    def tool_functions(self) -> tuple[ToolFunction, ...]:
        """The tools the prompt tells the model of (none under `tool_choice: "none"`)."""
        if not self.tools or self.tool_choice == "none":
            return ()
        return tuple(ToolFunction(t.function.name, t.function.description, t.function.parameters) for t in self.tools)

    def tool_choice_spec(self) -> ToolChoice | None:
        """What the answer may be, for the grammar; None when no tool may be called."""
        tools = self.tool_functions
        if not tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return ToolChoice(tools, "named", self.tool_choice.function.name, parallel=False)
        mode = "required" if self.tool_choice == "required" else "auto"
        return ToolChoice(tools, mode, parallel=self.parallel_tool_calls)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (llama-server's and vLLM's shape): the token ids a text becomes as a prompt."""

    model_config = ConfigDict(extra="ignore", strict=True)

    content: str | None = None
    prompt: str | None = None

    @model_validator(mode="after")
    def _has_text(self) -> "TokenizeRequest":
        if self.content is None and self.prompt is None:
            raise RequestValidationError("give the text to tokenize as content (or prompt)", "content")
        return self

    @property
    def text(self) -> str:
        return self.content if self.content is not None else self.prompt or ""


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


class RenderRequest(RespondRequest):
    """`POST /render`: a `/respond` body, and optionally the model name whose settings to render with
    (default: the model's own, as `/respond` uses)."""

    model: str | None = Field(None, min_length=1)
