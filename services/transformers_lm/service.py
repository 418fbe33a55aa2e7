"""The work of the LLM service, free of HTTP: configs merged and checked, prompts built, hypotheses generated.

`LMService` wraps a `LoadedModel`; `/respond`, `/generate_goals` and the OpenAI endpoints all go
through `LMService.start` (prompt → token streams) and read the streams with
`collect_completion` or `stream_pieces`, which is where the service's LLM metrics are taken (each
token as its reader gets it: what was served, not what the engine computed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from common.lm_protocol import (
    GenerateGoalsItem,
    GenerationConfig,
    RequestValidationError,
    RespondItem,
    goals_request,
)
from common.metrics import LLMMetrics, SequenceTimer, ServiceMetrics
from services.transformers_lm.backends import ChatMessage, LoadedModel
from services.transformers_lm.engines import FinishReason, GenerationRequest, SamplingParams, TokenStream
from services.transformers_lm.prompting import (
    BuiltPrompt,
    ChatTemplateRenderer,
    Conversation,
    IncrementalDetokenizer,
    PlainRenderer,
    PromptBuilder,
    PromptFormatRenderer,
    PromptRenderer,
    conversation_from_dream,
)
from services.transformers_lm.settings import Settings

logger = logging.getLogger(__name__)

class GenerationFailedError(RuntimeError):
    """Generation failed inside the engine: a failure of ours (500), not of the request."""


@dataclass(frozen=True)
class Completion:
    """One finished hypothesis: its text (cut at stop sequences), why it ended, and its token count."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


def choose_renderer(model: LoadedModel, settings: Settings) -> PromptRenderer:
    """prompt_format from the settings, else the model's chat template, else Dream's plain format."""
    if settings.prompt_format is not None:
        return PromptFormatRenderer(settings.prompt_format)
    if model.has_chat_template:
        return ChatTemplateRenderer(model.render_chat)
    return PlainRenderer(settings.language)


def sampling_params(config: GenerationConfig, index: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    """Engine settings for hypothesis number `index`; a seeded request seeds each hypothesis differently."""
    return SamplingParams(
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=min(config.min_new_tokens, config.max_new_tokens),
        do_sample=not config.is_greedy,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        repetition_penalty=config.repetition_penalty,
        frequency_penalty=config.frequency_penalty,
        presence_penalty=config.presence_penalty,
        seed=None if config.seed is None else config.seed + index,
        stop_token_ids=stop_token_ids,
    )


def _finish_reason(stream: TokenStream, stopped_by_sequence: bool) -> str:
    if stopped_by_sequence or stream.finish_reason in (FinishReason.STOP, FinishReason.CANCELLED):
        return "stop"
    return "length"


class LMService:
    """Answers dialogs with one loaded model, under one service's settings."""

    def __init__(self, model: LoadedModel, settings: Settings, default_config: GenerationConfig,
                 metrics: LLMMetrics | None = None):
        self.model = model
        self.settings = settings
        self.default_config = default_config
        self.metrics = metrics or LLMMetrics(ServiceMetrics(), settings.pretrained_model_name_or_path)
        self.metrics.read_engine_load(model.engine.load)
        self.renderer = choose_renderer(model, settings)
        self.prompt_builder = PromptBuilder(
            renderer=self.renderer,
            encode=model.encode,
            context_length=model.info.context_length,
            stop_sequences=(*settings.stop_sequences, *model.info.extra_stop_sequences),
        )

    # --- building blocks ----------------------------------------------------------------------
    def config_for(self, override: GenerationConfig | None, field: str) -> GenerationConfig:
        """The request's config merged over the model's default, checked against the caps."""
        config = self.default_config.merged_with(override)
        config.check_caps(self.settings.caps, field)
        return config

    def build_prompt(self, conversation: Conversation, config: GenerationConfig, field: str | None) -> BuiltPrompt:
        return self.prompt_builder.build(conversation, config.max_new_tokens, tuple(config.stop), field)

    def build_raw_prompt(self, text: str, config: GenerationConfig, field: str | None) -> BuiltPrompt:
        """A completion prompt used as is (OpenAI's /v1/completions), checked against the window."""
        token_ids = self.model.encode(text)
        if not token_ids:
            raise RequestValidationError("the prompt is empty", field)
        if len(token_ids) + config.max_new_tokens > self.model.info.context_length:
            raise RequestValidationError(
                f"the prompt's {len(token_ids)} tokens plus {config.max_new_tokens} new tokens exceed the "
                f"model's window of {self.model.info.context_length}",
                field,
            )
        stops = tuple(dict.fromkeys((*config.stop, *self.prompt_builder.stop_sequences)))
        return BuiltPrompt(tuple(token_ids), text, stops)

    def start(self, prompt: BuiltPrompt, config: GenerationConfig) -> list[TokenStream]:
        """Submit `num_return_sequences` sequences for the prompt to the engine."""
        streams: list[TokenStream] = []
        try:
            for index in range(config.num_return_sequences):
                params = sampling_params(config, index, self.model.info.eos_token_ids)
                streams.append(self.model.engine.submit(GenerationRequest(prompt.token_ids, params)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        self.metrics.prompt_submitted(len(prompt.token_ids))
        return streams

    def _finish_timer(self, timer: SequenceTimer, stream: TokenStream, reason: str, prompt: BuiltPrompt) -> None:
        timer.finish(reason, admitted_at=stream.admitted_at, prompt_tokens=len(prompt.token_ids),
                     cached_prompt_tokens=stream.cached_prompt_tokens)

    def collect_completion(self, stream: TokenStream, prompt: BuiltPrompt) -> Completion:
        """Read a stream to its end (or to a stop sequence, then cancel it)."""
        pieces = IncrementalDetokenizer(self.model.decode, prompt.stop_sequences)
        timer = self.metrics.sequence(stream.submitted_at)
        count = 0
        try:
            for token_id in stream:
                count += 1
                timer.token()
                pieces.add(token_id)
                if pieces.stopped:
                    stream.cancel()
                    break
        except Exception as error:
            raise GenerationFailedError(f"generation failed: {error}") from error
        pieces.finish()
        reason = _finish_reason(stream, pieces.stopped)
        self._finish_timer(timer, stream, reason, prompt)
        return Completion(pieces.text, reason, count)

    def complete_all(self, jobs: list[tuple[BuiltPrompt, GenerationConfig]]) -> list[list[Completion]]:
        """Submit every job's sequences first (so an engine can batch them), then collect them in order."""
        started: list[tuple[BuiltPrompt, list[TokenStream]]] = []
        try:
            for prompt, config in jobs:
                started.append((prompt, self.start(prompt, config)))
            return [[self.collect_completion(s, prompt) for s in streams] for prompt, streams in started]
        finally:
            for _, streams in started:
                for stream in streams:
                    stream.cancel()  # a no-op for finished streams; frees the rest after a failure

    def stream_pieces(self, stream: TokenStream, prompt: BuiltPrompt) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text piece, finish reason or None, tokens so far) as the stream produces text."""
        pieces = IncrementalDetokenizer(self.model.decode, prompt.stop_sequences)
        timer = self.metrics.sequence(stream.submitted_at)
        count = 0
        try:
            for token_id in stream:
                count += 1
                timer.token()
                piece = pieces.add(token_id)
                if piece:
                    yield piece, None, count
                if pieces.stopped:
                    stream.cancel()
                    break
        except GeneratorExit:  # the reader left early (a client gone): what it was sent counts, as an abort
            self._finish_timer(timer, stream, "abort", prompt)
            raise
        except Exception as error:
            raise GenerationFailedError(f"generation failed: {error}") from error
        finally:
            stream.cancel()
        reason = _finish_reason(stream, pieces.stopped)
        self._finish_timer(timer, stream, reason, prompt)
        yield pieces.finish(), reason, count

    # --- Dream endpoints ----------------------------------------------------------------------
    def respond(self, items: list[RespondItem]) -> list[list[str]]:
        """Hypotheses for each dialog: every item is checked before any generation starts."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]")
            conversation = conversation_from_dream(item.prompt, item.dialog_context)
            jobs.append((self.build_prompt(conversation, config, f"dialog_contexts[{index}]"), config))
        return [[c.text.strip() for c in completions] for completions in self.complete_all(jobs)]

    def generate_goals(self, items: list[GenerateGoalsItem]) -> list[str]:
        """For each prompt, a short description of what a bot with that prompt can do."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]").merged_with(
                GenerationConfig(num_return_sequences=1)
            )
            request = goals_request(item.prompt)
            jobs.append((self.build_prompt(Conversation("", (ChatMessage("user", request),)), config, f"prompts[{index}]"), config))
        return [completions[0].text.strip() for completions in self.complete_all(jobs)]

    def warm_up(self) -> str:
        """One short greedy generation, so the first real request pays no first-call costs. It runs
        before the service serves (no request runs beside it) and is not counted in the metrics."""
        config = GenerationConfig(max_new_tokens=2, num_return_sequences=1)
        prompt = self.build_prompt(conversation_from_dream("", ["Hello!"]), config, None)
        served_metrics, self.metrics = self.metrics, LLMMetrics(ServiceMetrics(), "warm-up")
        try:
            return self.complete_all([(prompt, config)])[0][0].text
        finally:
            self.metrics = served_metrics

