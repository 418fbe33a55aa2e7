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
from services.transformers_lm.backends import ChatMessage
from services.transformers_lm.prompting import BuiltPrompt, conversation_from_messages
from services.transformers_lm.protocol import (
    OPENAI_PARAM_FOR_KEY,
    ChatCompletionRequest,
    CompletionRequest,
    openai_error,
)
from services.transformers_lm.service import LMService

logger = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """The request names a model this service does not serve (404)."""

    def __init__(self, requested: str, served: list[str]):
        super().__init__(f"The model '{requested}' does not exist here; this service serves: {', '.join(served)}")
        self.message = str(self)


def _as_openai_param(error: RequestValidationError) -> RequestValidationError:
    """The same error, naming OpenAI's parameter (max_tokens, n) instead of our generation key."""
    key = (error.field or "").split(".")[0].split("[")[0]
    param = OPENAI_PARAM_FOR_KEY.get(key, key or None)
    message = error.message.replace(key, param) if key and param else error.message
    return RequestValidationError(message, param)


def generation_config(service: LMService, request: ChatCompletionRequest | CompletionRequest) -> GenerationConfig:
    """The model's default config with the request's parameters over it, checked against the caps."""
    try:
        override = GenerationConfig.model_validate(request.generation_override())
    except ValidationError as error:
        raise _as_openai_param(request_error(error, model=GenerationConfig)) from None
    try:
        return service.config_for(override, None)
    except RequestValidationError as error:
        raise _as_openai_param(error) from None


def list_models(service: LMService, created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "parley"}
            for name in service.settings.served_model_names
        ],
    }


def check_model(service: LMService, requested: str) -> None:
    served = service.settings.served_model_names
    if requested not in served:
        raise ModelNotFoundError(requested, served)


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


def _chat_choice(index: int, text: str, finish_reason: str) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _chat_prompt(
    service: LMService, request: ChatCompletionRequest, config: GenerationConfig
) -> tuple[BuiltPrompt, GenerationConfig]:
    messages = [ChatMessage(m.role, m.text) for m in request.messages]
    try:
        return service.build_prompt(conversation_from_messages(messages), config, "messages")
    except RequestValidationError as error:
        raise _as_openai_param(error) from None


def chat_completion(service: LMService, request: ChatCompletionRequest) -> dict | Iterator[str]:
    """A chat completion object, or (stream=true) an iterator of server-sent events."""
    check_model(service, request.model)
    config = generation_config(service, request)
    prompt, config = _chat_prompt(service, request, config)
    if request.stream:
        return _stream_events(service, _CHAT, request.model, [(prompt, config)], request.include_usage_in_stream)
    completions = service.complete_all([(prompt, config)])[0]
    return {
        "id": _CHAT.id_prefix + uuid.uuid4().hex,
        "object": _CHAT.object_name,
        "created": int(time.time()),
        "model": request.model,
        "choices": [_chat_choice(i, c.text.lstrip(), c.finish_reason) for i, c in enumerate(completions)],
        "usage": _usage(len(prompt.token_ids), sum(c.completion_tokens for c in completions)),
    }


def completion(service: LMService, request: CompletionRequest) -> dict | Iterator[str]:
    """A text completion object (`n` choices per prompt), or an iterator of server-sent events."""
    check_model(service, request.model)
    config = generation_config(service, request)
    jobs = [service.build_raw_prompt(text, config, "prompt") for text in request.prompts]
    prompts = [prompt for prompt, _ in jobs]
    if request.stream:
        return _stream_events(service, _TEXT, request.model, jobs, request.include_usage_in_stream)
    results = service.complete_all(jobs)
    choices = [c for completions in results for c in completions]
    return {
        "id": _TEXT.id_prefix + uuid.uuid4().hex,
        "object": _TEXT.object_name,
        "created": int(time.time()),
        "model": request.model,
        "choices": [_text_choice(i, c.text, c.finish_reason) for i, c in enumerate(choices)],
        "usage": _usage(sum(len(p.token_ids) for p in prompts), sum(c.completion_tokens for c in choices)),
    }


def _stream_events(
    service: LMService,
    kind: _Kind,
    model_name: str,
    jobs: list[tuple[BuiltPrompt, GenerationConfig]],
    include_usage: bool,
) -> Iterator[str]:
    """Start every sequence now (so queue-full is still an HTTP error), then stream them choice by choice."""
    prompts = [prompt for prompt, _ in jobs]
    started = [(prompt, stream) for prompt, config in jobs for stream in service.start(prompt, config)]
    completion_id = kind.id_prefix + uuid.uuid4().hex
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": completion_id, "object": kind.chunk_object_name, "created": created, "model": model_name}
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def events() -> Iterator[str]:
        completion_tokens = 0
        try:
            for index, (prompt, stream) in enumerate(started):
                if kind is _CHAT:
                    yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                at_start = True
                for piece, finish_reason, tokens in service.stream_pieces(stream, prompt):
                    if kind is _CHAT and at_start:
                        piece = piece.lstrip()  # as the non-streamed answer: no space before the first word
                        at_start = not piece
                    if finish_reason is not None:
                        completion_tokens += tokens
                    if piece or finish_reason is not None:
                        if kind is _CHAT:
                            delta = {"content": piece} if piece else {}
                            yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
                        else:
                            yield chunk([_text_choice(index, piece, finish_reason)])
            if include_usage:
                yield chunk([], _usage(sum(len(p.token_ids) for p in prompts), completion_tokens))
        except Exception as error:  # noqa: BLE001 - the status line is sent: report it in the stream
            logger.exception("streamed generation failed")
            yield _sse(openai_error(str(error), "server_error"))
        finally:
            for _, stream in started:
                stream.cancel()
        yield _sse("[DONE]")

    return events()
