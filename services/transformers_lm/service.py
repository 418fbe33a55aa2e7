"""The work of the LLM service, free of HTTP: configs merged and checked, prompts built, hypotheses generated.

`LMService` wraps a `LoadedModel`; `/respond`, `/generate_goals` and the OpenAI endpoints all go
through `LMService.start` (prompt → token streams) and read the streams with
`collect_completion` or `stream_pieces`.

A config is merged over the model's default and checked (`config_for`), then fitted to its prompt
(`build_prompt`: `max_length` / `min_length` become new-token counts, Dream's replacement pairs
rewrite the prompt). `num_beams` > 1 runs the engine's beam search: one request, `num_beams` rows.
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
from services.transformers_lm.backends import ChatMessage, LoadedModel
from services.transformers_lm.engines import (
    BeamSearchParams,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenStream,
)
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
    """Engine settings for hypothesis number `index`; a seeded request seeds each hypothesis differently.

    `stop_token_ids` are the model's end tokens; the config's `eos_token_id` are added to them.
    """
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
        stop_token_ids=tuple(dict.fromkeys((*stop_token_ids, *config.eos_token_id))),
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        typical_p=config.typical_p,
    )


def beam_search_params(config: GenerationConfig) -> BeamSearchParams | None:
    """The engine's beam search settings when the config asks for beams (num_beams > 1)."""
    if config.num_beams <= 1:
        return None
    return BeamSearchParams(
        num_beams=config.num_beams,
        num_return_sequences=config.num_return_sequences,
        length_penalty=config.length_penalty,
        early_stopping=config.early_stopping,
    )


def _finish_reason(stream: TokenStream, stopped_by_sequence: bool) -> str:
    if stopped_by_sequence or stream.finish_reason in (FinishReason.STOP, FinishReason.CANCELLED):
        return "stop"
    return "length"


class LMService:
    """Answers dialogs with one loaded model, under one service's settings."""

    def __init__(self, model: LoadedModel, settings: Settings, default_config: GenerationConfig):
        self.model = model
        self.settings = settings
        self.default_config = default_config
        self.renderer = choose_renderer(model, settings)
        self.prompt_builder = PromptBuilder(
            renderer=self.renderer,
            encode=model.encode,
            context_length=model.info.context_length,
            stop_sequences=(*settings.stop_sequences, *model.info.extra_stop_sequences),
        )

    # --- building blocks ----------------------------------------------------------------------
    def config_for(self, override: GenerationConfig | None, field: str | None) -> GenerationConfig:
        """The request's config merged over the model's default, checked against the caps and the model."""
        config = self.default_config.merged_with(override)
        config.check_caps(self.settings.caps, field or "")
        prefix = f"{field}." if field else ""
        vocabulary = self.model.info.vocab_size
        for position, token_id in enumerate(config.eos_token_id):
            if vocabulary and token_id >= vocabulary:
                raise RequestValidationError(
                    f"{prefix}eos_token_id: {token_id} is not a token id of this model (its vocabulary has "
                    f"{vocabulary} tokens)",
                    f"{prefix}eos_token_id[{position}]",
                )
        slots = self.model.engine.max_batch_size
        if config.num_beams > slots:
            raise RequestValidationError(
                f"{prefix}num_beams: {config.num_beams} beams need as many batch slots, and this service has "
                f"{slots} (MAX_BATCH_SIZE)",
                f"{prefix}num_beams",
            )
        return config

    def build_prompt(
        self, conversation: Conversation, config: GenerationConfig, field: str | None, config_field: str | None = None
    ) -> tuple[BuiltPrompt, GenerationConfig]:
        """The prompt for the conversation, and the config fitted to it (lengths as new-token counts)."""
        prompt = self.prompt_builder.build(
            conversation,
            config.max_new_tokens,
            tuple(config.stop),
            field,
            max_length=config.max_length,
            rewrite=config.replace_in_prompt if config.replacement else None,
        )
        return prompt, self._fit(prompt, config, config_field)

    def build_raw_prompt(
        self, text: str, config: GenerationConfig, field: str | None
    ) -> tuple[BuiltPrompt, GenerationConfig]:
        """A completion prompt used as is (OpenAI's /v1/completions), checked against the window."""
        token_ids = self.model.encode(text)
        if not token_ids:
            raise RequestValidationError("the prompt is empty", field)
        new_tokens = 1 if config.max_length is not None else config.max_new_tokens
        if len(token_ids) + new_tokens > self.model.info.context_length:
            raise RequestValidationError(
                f"the prompt's {len(token_ids)} tokens plus {new_tokens} new tokens exceed the "
                f"model's window of {self.model.info.context_length}",
                field,
            )
        stops = tuple(dict.fromkeys((*config.stop, *self.prompt_builder.stop_sequences)))
        prompt = BuiltPrompt(tuple(token_ids), text, stops)
        return prompt, self._fit(prompt, config, None)

    def _fit(self, prompt: BuiltPrompt, config: GenerationConfig, config_field: str | None) -> GenerationConfig:
        return config.resolved_for_prompt(
            len(prompt.token_ids), self.model.info.context_length, self.settings.caps, config_field or ""
        )

    def start(self, prompt: BuiltPrompt, config: GenerationConfig) -> list[TokenStream]:
        """Submit the prompt's sequences to the engine: `num_return_sequences` of them, or one beam search."""
        engine = self.model.engine
        beam = beam_search_params(config)
        if beam is not None:
            params = sampling_params(config, 0, self.model.info.eos_token_ids)
            return engine.submit_beam_search(GenerationRequest(prompt.token_ids, params, beam))
        streams: list[TokenStream] = []
        try:
            for index in range(config.num_return_sequences):
                params = sampling_params(config, index, self.model.info.eos_token_ids)
                streams.append(engine.submit(GenerationRequest(prompt.token_ids, params)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def collect_completion(
        self, stream: TokenStream, prompt: BuiltPrompt, config: GenerationConfig | None = None
    ) -> Completion:
        """Read a stream to its end (or to a stop sequence, then cancel it).

        With Dream's replacement pairs in `config`, the text is decoded with special tokens kept (a
        pair may name one, as Dream's do) and each stand-in turned back into its text, as Dream does.
        """
        if config is not None and config.replacement:
            pieces = IncrementalDetokenizer(
                lambda token_ids: self.model.decode(token_ids, skip_special=False),
                prompt.stop_sequences,
                transform=config.restore_in_hypothesis,
            )
        else:
            pieces = IncrementalDetokenizer(self.model.decode, prompt.stop_sequences)
        count = 0
        try:
            for token_id in stream:
                count += 1
                pieces.add(token_id)
                if pieces.stopped:
                    stream.cancel()
                    break
        except Exception as error:
            raise GenerationFailedError(f"generation failed: {error}") from error
        pieces.finish()
        text = pieces.final_text() if pieces.transform is not None else pieces.text
        return Completion(text, _finish_reason(stream, pieces.stopped), count)

    def complete_all(self, jobs: list[tuple[BuiltPrompt, GenerationConfig]]) -> list[list[Completion]]:
        """Submit every job's sequences first (so an engine can batch them), then collect them in order."""
        started: list[tuple[BuiltPrompt, list[TokenStream]]] = []
        try:
            for prompt, config in jobs:
                started.append((prompt, self.start(prompt, config)))
            return [
                [self.collect_completion(s, prompt, config) for s in streams]
                for (prompt, streams), (_, config) in zip(started, jobs, strict=True)
            ]
        finally:
            for _, streams in started:
                for stream in streams:
                    stream.cancel()  # a no-op for finished streams; frees the rest after a failure

    def stream_pieces(self, stream: TokenStream, prompt: BuiltPrompt) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text piece, finish reason or None, tokens so far) as the stream produces text."""
        pieces = IncrementalDetokenizer(self.model.decode, prompt.stop_sequences)
        count = 0
        try:
            for token_id in stream:
                count += 1
                piece = pieces.add(token_id)
                if piece:
                    yield piece, None, count
                if pieces.stopped:
                    stream.cancel()
                    break
        except Exception as error:
            raise GenerationFailedError(f"generation failed: {error}") from error
        finally:
            stream.cancel()
        yield pieces.finish(), _finish_reason(stream, pieces.stopped), count

    # --- Dream endpoints ----------------------------------------------------------------------
    def respond(self, items: list[RespondItem]) -> list[list[str]]:
        """Hypotheses for each dialog: every item is checked before any generation starts."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]")
            conversation = conversation_from_dream(item.prompt, item.dialog_context)
            jobs.append(self.build_prompt(conversation, config, f"dialog_contexts[{index}]", f"configs[{index}]"))
        return [[c.text.strip() for c in completions] for completions in self.complete_all(jobs)]

    def generate_goals(self, items: list[GenerateGoalsItem]) -> list[str]:
        """For each prompt, a short description of what a bot with that prompt can do."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]").merged_with(
                GenerationConfig(num_return_sequences=1)
            )
            conversation = Conversation("", (ChatMessage("user", goals_request(item.prompt)),))
            jobs.append(self.build_prompt(conversation, config, f"prompts[{index}]", f"configs[{index}]"))
        return [completions[0].text.strip() for completions in self.complete_all(jobs)]

    def warm_up(self) -> str:
        """One short greedy generation, so the first real request pays no first-call costs."""
        config = GenerationConfig(max_new_tokens=2, num_return_sequences=1)
        job = self.build_prompt(conversation_from_dream("", ["Hello!"]), config, None)
        return self.complete_all([job])[0][0].text

