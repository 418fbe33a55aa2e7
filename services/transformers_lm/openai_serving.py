"""OpenAI's chat completions and completions over `LMService`: response objects and server-sent events.

Plain functions of (service, validated request); every check runs before the first event is
sent, so a bad request is a 4xx, never a broken stream. The prompt is built exactly as for
`/respond` (chat template, `prompt_format` or Dream's plain format).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from pydantic import ValidationError

from common.lm_protocol import GenerationConfig
from common.validation import RequestValidationError, request_error
from services.transformers_lm.engines.grammar import Grammar
from services.transformers_lm.prompting import BuiltPrompt, conversation_from_messages
from services.transformers_lm.protocol import (
    OPENAI_PARAM_FOR_KEY,
    ChatCompletionRequest,
    CompletionRequest,
    openai_error,
)
from services.transformers_lm.engines import TokenStream
from services.transformers_lm.service import LMService, ModelNotFoundError, ServedName
from services.transformers_lm.structured_output import (
    CallDelta,
    ToolCallReader,
    ToolChoice,
    iterate_calls,
)

__all__ = ["ModelNotFoundError", "chat_completion", "chat_rendering", "completion", "list_models"]

logger = logging.getLogger(__name__)


def _as_openai_param(error: RequestValidationError) -> RequestValidationError:
    """The same error, naming OpenAI's parameter (max_tokens, n) instead of our generation key."""
    key = (error.field or "").split(".")[0].split("[")[0]
    param = OPENAI_PARAM_FOR_KEY.get(key, key or None)
    message = error.message.replace(key, param) if key and param else error.message
    return type(error)(message, param)  # its kind stays (a context overflow keeps its code)


def generation_config(
    service: LMService, request: ChatCompletionRequest | CompletionRequest, served: ServedName
) -> GenerationConfig:
    """The name's default config with the request's parameters over it, checked against the caps."""
    try:
        override = GenerationConfig.model_validate(request.generation_override())
    except ValidationError as error:
        raise _as_openai_param(request_error(error, model=GenerationConfig)) from None
    try:
        return service.config_for(override, None, served)
    except RequestValidationError as error:
        raise _as_openai_param(error) from None


def list_models(service: LMService, created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "parley"}
            for name in service.names
        ],
    }


@dataclass(frozen=True)
class _Kind:
    object_name: str
    chunk_object_name: str
    id_prefix: str


_CHAT = _Kind("chat.completion", "chat.completion.chunk", "chatcmpl-")
_TEXT = _Kind("text_completion", "text_completion", "cmpl-")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _ChatAnswer:
    """One choice of a chat completion, read from its token stream the same way whether it is streamed
    or not: its content, or its tool calls (read by `ToolCallReader` when tools may be called)."""

    def __init__(self, service: LMService, prompt: BuiltPrompt, stream: TokenStream, tool_choice: ToolChoice | None):
        self.service, self.prompt, self.stream = service, prompt, stream
        self.reader = ToolCallReader() if tool_choice is not None else None
        self.content = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def deltas(self) -> Iterator[tuple[str, list[CallDelta], str | None]]:
        """(content piece, call deltas, finish reason once it ended), as the stream produces text."""
        at_start = True
        for piece, finish_reason, tokens in self.service.stream_pieces(self.stream, self.prompt):
            calls: list[CallDelta] = []
            if self.reader is not None:
                content, calls = self.reader.feed(piece, final=finish_reason is not None)
                if self.reader.repeated and finish_reason is None:
                    self.stream.cancel()  # the rest could only repeat a call: the answer is complete
                    finish_reason = "stop"
            else:
                content = piece.lstrip() if at_start else piece
                at_start = at_start and not content  # as the non-streamed answer: no space before the first word
            self.content += content
            if finish_reason is not None:
                if self.reader is not None and self.reader.sent_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
                self.finish_reason, self.completion_tokens = finish_reason, tokens
            yield content, calls, finish_reason
            if finish_reason is not None:
                return

    def choice(self, index: int) -> dict:
        """The whole choice, once `deltas()` was read to its end."""
        message: dict = {"role": "assistant", "content": self.content}
        if self.reader is not None and self.reader.sent_calls:
            message = {"role": "assistant", "content": None, "tool_calls": list(iterate_calls(self.reader))}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": self.finish_reason}

    def read(self) -> "_ChatAnswer":
        for _ in self.deltas():
            pass
        return self


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _chat_prompt(
    service: LMService, request: ChatCompletionRequest, config: GenerationConfig, served: ServedName
) -> tuple[BuiltPrompt, GenerationConfig]:
    """The prompt, and the config fitted to it (a length in it that the prompt leaves no room for is
    the request's error, named by OpenAI's parameter)."""
    messages = [m.as_chat_message() for m in request.messages]
    try:
        return service.build_prompt(conversation_from_messages(messages, request.tool_functions), config, "messages", served)
    except RequestValidationError as error:
        raise _as_openai_param(error) from None


def chat_rendering(service: LMService, request: ChatCompletionRequest) -> dict:
    """The prompt, token count, stops and config a chat completion request would be generated from."""
    served = service.served(request.model)
    prompt, config = _chat_prompt(service, request, generation_config(service, request, served), served)
    return service.rendering(served, prompt, config)


def chat_completion(service: LMService, request: ChatCompletionRequest) -> dict | Iterator[str]:
    """A chat completion object, or (stream=true) an iterator of server-sent events."""
    served = service.served(request.model)
    config = generation_config(service, request, served)
    tool_choice = request.tool_choice_spec()
    grammar = service.grammar(config.response_format, tool_choice, "response_format")
    prompt, config = _chat_prompt(service, request, config, served)
    if request.stream:
        return _stream_events(
            service, _CHAT, request.model, [(prompt, config)], request.include_usage_in_stream, grammar, tool_choice
        )
    streams = service.start(prompt, config, grammar)
    try:
        answers = [_ChatAnswer(service, prompt, stream, tool_choice).read() for stream in streams]
    finally:
        for stream in streams:
            stream.cancel()  # a no-op for finished streams; frees the rest after a failure
    return {
        "id": _CHAT.id_prefix + uuid.uuid4().hex,
        "object": _CHAT.object_name,
        "created": int(time.time()),
        "model": request.model,
        "choices": [answer.choice(i) for i, answer in enumerate(answers)],
        "usage": _usage(len(prompt.token_ids), sum(answer.completion_tokens for answer in answers)),
    }


def completion(service: LMService, request: CompletionRequest) -> dict | Iterator[str]:
    """A text completion object (`n` choices per prompt), or an iterator of server-sent events."""
    served = service.served(request.model)
    config = generation_config(service, request, served)
    grammar = service.grammar(config.response_format, None, "response_format")
    jobs = [service.build_raw_prompt(text, config, "prompt", served) for text in request.prompts]
    prompts = [prompt for prompt, _ in jobs]
    if request.stream:
        return _stream_events(service, _TEXT, request.model, jobs, request.include_usage_in_stream, grammar)
    results = service.complete_all(jobs, [grammar] * len(jobs))
    choices = [c for completions in results for c in completions]
    return {
        "id": _TEXT.id_prefix + uuid.uuid4().hex,
        "object": _TEXT.object_name,
        "created": int(time.time()),
        "model": request.model,
        "choices": [_text_choice(i, c.text, c.finish_reason) for i, c in enumerate(choices)],
        "usage": _usage(sum(len(p.token_ids) for p in prompts), sum(c.completion_tokens for c in choices)),
    }


def _call_delta(delta: CallDelta) -> dict:
    """A tool call's piece of a chunk: the id, type and name in its first, argument text after."""
    call: dict = {"index": delta.index}
    if delta.id is not None:
        call["id"] = delta.id
        call["type"] = "function"
        call["function"] = {"name": delta.name, "arguments": delta.arguments}
    else:
        call["function"] = {"arguments": delta.arguments}
    return call


def _stream_events(
    service: LMService,
    kind: _Kind,
    model_name: str,
    jobs: list[tuple[BuiltPrompt, GenerationConfig]],
    include_usage: bool,
    grammar: Grammar | None = None,
    tool_choice: ToolChoice | None = None,
) -> Iterator[str]:
    """Start every sequence now (so queue-full is still an HTTP error), then stream them choice by choice."""
    prompts = [prompt for prompt, _ in jobs]
    started = [(prompt, stream) for prompt, config in jobs for stream in service.start(prompt, config, grammar)]
    completion_id = kind.id_prefix + uuid.uuid4().hex
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": completion_id, "object": kind.chunk_object_name, "created": created, "model": model_name}
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def chat_delta(index: int, delta: dict, finish_reason: str | None = None) -> str:
        return chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def chat_events(index: int, prompt: BuiltPrompt, stream) -> Iterator[tuple[str, int]]:
        """One choice's chunks, and its token count once it ended."""
        yield chat_delta(index, {"role": "assistant", "content": ""}), 0
        answer = _ChatAnswer(service, prompt, stream, tool_choice)
        for content, calls, finish_reason in answer.deltas():
            if content:
                yield chat_delta(index, {"content": content}), 0
            for call in calls:
                yield chat_delta(index, {"tool_calls": [_call_delta(call)]}), 0
            if finish_reason is not None:
                yield chat_delta(index, {}, finish_reason), answer.completion_tokens

    def text_events(index: int, prompt: BuiltPrompt, stream) -> Iterator[tuple[str, int]]:
        for piece, finish_reason, tokens in service.stream_pieces(stream, prompt):
            if piece or finish_reason is not None:
                yield chunk([_text_choice(index, piece, finish_reason)]), tokens if finish_reason is not None else 0

    def events() -> Iterator[str]:
        completion_tokens = 0
        try:
            for index, (prompt, stream) in enumerate(started):
                choice_events = chat_events if kind is _CHAT else text_events
                for event, tokens in choice_events(index, prompt, stream):
                    completion_tokens += tokens
                    yield event
            if include_usage:
                yield chunk([], _usage(sum(len(p.token_ids) for p in prompts), completion_tokens))
        except Exception as error:  # noqa: BLE001 - the status line is sent: report it in the stream, then end it
            logger.exception("streamed generation failed")
            yield _sse_error(openai_error(f"generation failed: {error}", "server_error"))
            return
        finally:
            for _, stream in started:
                stream.cancel()
        yield _sse("[DONE]")

    return events()


def _sse_error(body: dict) -> str:
    """An `error` event: the last event of a stream that failed after it started."""
    return f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
