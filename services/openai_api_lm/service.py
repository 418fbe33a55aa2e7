"""The work of the OpenAI-API LLM service: Dream's dialogs in, chat completions from the upstream, hypotheses out.

Knows nothing of HTTP on its own side; the upstream is reached through `ChatCompletionsClient`.
Every dialog of a request becomes one chat completion call (several run at once), and all of a
request's calls share one deadline, `GENERATIVE_TIMEOUT` seconds from its start.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from pydantic import ValidationError

from common import tracing
from common.metrics import EngineLoad, LLMMetrics, ServiceMetrics
from common.validation import request_error
from services.openai_api_lm.protocol import OpenAIGenerationConfig, RequestKeys
from services.openai_api_lm.settings import Settings
from services.openai_api_lm.upstream import ChatCompletionsClient, Credentials, UpstreamResponseError
from common.lm_protocol import GenerateGoalsItem, RespondItem, dream_turns, goals_request, load_default_config

logger = logging.getLogger(__name__)

# Dialogs of one request asked at once; more wait for a free slot (within the same deadline).
MAX_PARALLEL_UPSTREAM_CALLS = 8

T = TypeVar("T")
R = TypeVar("R")


def chat_messages(prompt: str, dialog_context: Sequence[str]) -> list[dict[str, str]]:
    """The prompt as the system message, then the dialog as turns that alternate and end with the user's."""
    messages = [{"role": "system", "content": prompt}] if prompt else []
    messages.extend({"role": role, "content": utterance} for role, utterance in dream_turns(list(dialog_context)))
    return messages


def with_replacement(messages: list[dict[str, str]], config: OpenAIGenerationConfig) -> list[dict[str, str]]:
    """The messages with Dream's replacement pairs applied to their text (the upstream sees the stand-ins)."""
    if not config.replacement:
        return messages
    return [{**message, "content": config.replace_in_prompt(message["content"])} for message in messages]


def goals_messages(prompt: str) -> list[dict[str, str]]:
    """One user message: the goals instruction with the bot's prompt in it."""
    return chat_messages("", [goals_request(prompt)])


def hypotheses_from(answer: dict[str, Any]) -> list[str]:
    """The texts of a chat completion's choices, in `index` order, stripped (a null content is "")."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise UpstreamResponseError("the upstream's answer has no `choices` list: is the base URL an OpenAI API root?")
    texts = []
    for position, choice in enumerate(sorted(choices, key=_choice_index)):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise UpstreamResponseError(f"the upstream's choices[{position}].message.content is not text")
        texts.append((content or "").strip())
    return texts


def _choice_index(choice: Any) -> int:
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, int) else 0


class OpenAIApiLM:
    """Answers Dream's requests through one OpenAI-compatible upstream model."""

    def __init__(self, settings: Settings, client: ChatCompletionsClient | None = None, *,
                 metrics: LLMMetrics | None = None):
        self.settings = settings
        self.client = client or ChatCompletionsClient(settings.chat_completions_url)
        # vLLM's metrics where a forwarder can measure them: upstream calls in flight, their latency,
        # the tokens the upstream reports in `usage`, and each choice's finish reason.
        self.metrics = metrics or LLMMetrics(ServiceMetrics(), settings.pretrained_model_name_or_path)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.metrics.read_engine_load(lambda: EngineLoad(running=self._in_flight, waiting=0, kv_cache_usage=0.0))
        # A file that cannot be used, or a default over the caps, is a SettingsError at start-up.
        self.default_config = load_default_config(settings.generative_config, settings.caps, OpenAIGenerationConfig)
        self._pool = ThreadPoolExecutor(MAX_PARALLEL_UPSTREAM_CALLS, thread_name_prefix="upstream")

    def respond(self, items: Sequence[RespondItem], keys: RequestKeys) -> list[list[str]]:
        """Hypotheses for every dialog: `num_return_sequences` each, in the order the dialogs came."""
        deadline = time.monotonic() + self.settings.generative_timeout
        configs = [self._config(item.config, f"configs[{index}]") for index, item in enumerate(items)]
        credentials = self._credentials(keys, len(items))
        calls = [
            (with_replacement(chat_messages(item.prompt, item.dialog_context), config), config, credential)
            for item, config, credential in zip(items, configs, credentials, strict=True)
        ]
        return self._map(lambda call: self._hypotheses(*call, deadline), calls)

    def generate_goals(self, items: Sequence[GenerateGoalsItem], keys: RequestKeys) -> list[str]:
        """For each prompt, a short description of what an assistant with that prompt is for."""
        deadline = time.monotonic() + self.settings.generative_timeout
        one = OpenAIGenerationConfig(num_return_sequences=1)  # one description per prompt: ask for one
        configs = [self._config(item.config, f"configs[{index}]").merged_with(one) for index, item in enumerate(items)]
        credentials = self._credentials(keys, len(items))
        calls = [
            (with_replacement(goals_messages(item.prompt), config), config, credential)
            for item, config, credential in zip(items, configs, credentials, strict=True)
        ]
        return [texts[0] for texts in self._map(lambda call: self._hypotheses(*call, deadline), calls)]

    def upstream_body(self, messages: list[dict[str, str]], config: OpenAIGenerationConfig) -> dict[str, Any]:
        """The chat completion request the upstream gets for these messages (no key: that goes in a header)."""
        return {"model": self.settings.pretrained_model_name_or_path, "messages": messages, **config.to_openai_parameters()}

    def render(self, items: Sequence[RespondItem]) -> list[dict[str, Any]]:
        """What `/respond` would send upstream for each dialog, without sending it (`/render`)."""
        configs = [self._config(item.config, f"configs[{index}]") for index, item in enumerate(items)]
        return [
            self.rendering(self.upstream_body(chat_messages(item.prompt, item.dialog_context), config), config)
            for item, config in zip(items, configs, strict=True)
        ]

    def render_chat(self, messages: list[dict[str, str]], override: dict[str, Any]) -> dict[str, Any]:
        """What a chat completion body would be sent upstream as, its parameters over the default config (`/v1/render`)."""
        try:
            config = self.default_config.merged_with(OpenAIGenerationConfig.model_validate(override))
        except ValidationError as error:
            raise request_error(error, model=OpenAIGenerationConfig) from None
        config.check_caps(self.settings.caps)
        return self.rendering(self.upstream_body(messages, config), config)

    def rendering(self, body: dict[str, Any], config: OpenAIGenerationConfig) -> dict[str, Any]:
        return {
            "model": self.settings.pretrained_model_name_or_path,
            "upstream": self.settings.chat_completions_url,
            "request": body,
            # The upstream tokenizes with its own tokenizer, which this service does not have.
            "prompt_tokens": None,
            "prompt_tokens_note": "the upstream counts the tokens (its answer's usage.prompt_tokens); this service cannot",
            "stop": list(config.stop),
            "generation_config": config.model_dump(),
        }

    def _config(self, override: Any, field: str) -> OpenAIGenerationConfig:
        config = self.default_config.merged_with(override)
        config.check_caps(self.settings.caps, field)
        return config

    def _credentials(self, keys: RequestKeys, count: int) -> list[Credentials]:
        own = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        if not self.settings.allow_request_api_keys:
            if keys.present:
                logger.info("the request's own API key fields are ignored (ALLOW_REQUEST_API_KEYS is off)")
            return [Credentials(own)] * count
        return [
            Credentials(api_key or own, organization)
            for api_key, organization in zip(keys.api_keys, keys.organizations, strict=True)
        ]

    def _hypotheses(
        self, messages: list[dict[str, str]], config: OpenAIGenerationConfig, credentials: Credentials, deadline: float
    ) -> list[str]:
        """`n` texts for one dialog; an upstream that returns fewer choices than asked is asked again."""
        parameters = config.to_openai_parameters()
        wanted = parameters["n"]
        texts: list[str] = []
        while len(texts) < wanted:
            body = self.upstream_body(messages, config)
            body["n"] = wanted - len(texts)
            new = hypotheses_from(self._create(body, credentials, deadline))
            if not new:
                raise UpstreamResponseError("the upstream's answer has no choices")
            texts.extend(new)
        if config.replacement:  # Dream's pairs: each stand-in in a hypothesis back into its text
            texts = [config.restore_in_hypothesis(text).strip() for text in texts]
        return texts[:wanted]

    def _create(self, body: dict[str, Any], credentials: Credentials, deadline: float) -> dict[str, Any]:
        """One upstream call, counted: in flight while it runs; its latency, tokens and finish reasons after."""
        started = time.monotonic()
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            answer = self.client.create(body, credentials, deadline)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
        self.metrics.e2e_latency.observe(time.monotonic() - started)
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        for name, counter in (("prompt_tokens", self.metrics.prompt_tokens), ("completion_tokens", self.metrics.generation_tokens)):
            if isinstance(usage.get(name), int) and usage[name] >= 0:
                counter.inc(usage[name])
        for choice in answer.get("choices") or []:
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            self.metrics.request_success["length" if reason == "length" else "stop"].inc()
        return answer

    def _map(self, work: Callable[[T], R], calls: Sequence[T]) -> list[R]:
        """`work` on every call, at once when there are several (each in the request's trace context);
        the first failure is raised."""
        if len(calls) == 1:
            return [work(calls[0])]
        futures = [tracing.submit_in_context(self._pool, work, call) for call in calls]
        return [future.result() for future in futures]
