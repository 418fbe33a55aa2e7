"""The work of the LLM service, free of HTTP: configs merged and checked, prompts built, hypotheses generated.

`LMService` wraps a `LoadedModel`; `/respond`, `/generate_goals` and the OpenAI endpoints all go
through `LMService.start` (prompt → token streams) and read the streams with
`collect_completion` or `stream_pieces`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from common.lm_protocol import (
    GenerateGoalsItem,
    GenerationConfig,
    RequestValidationError,
    ResponseFormat,
    RespondItem,
    goals_request,
)
from services.transformers_lm.backends import ChatMessage, LoadedModel
from services.transformers_lm.engines import FinishReason, GenerationRequest, SamplingParams, TokenStream
from services.transformers_lm.engines.grammar import Grammar, GrammarError
from services.transformers_lm.prompting import (
    BuiltPrompt,
    ChatTemplateRenderer,
    ContextLengthExceededError,
    Conversation,
    IncrementalDetokenizer,
    PlainRenderer,
    PromptBuilder,
    PromptFormatRenderer,
    PromptRenderer,
    conversation_from_dream,
)
from services.transformers_lm.settings import Settings
from services.transformers_lm.structured_output import ToolChoice, grammar_source

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
        return ChatTemplateRenderer(model.render_chat, takes_tools=model.chat_template_takes_tools)
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
            raise ContextLengthExceededError(
                f"the prompt's {len(token_ids)} tokens plus {config.max_new_tokens} new tokens exceed the "
                f"model's window of {self.model.info.context_length}",
                field,
            )
        stops = tuple(dict.fromkeys((*config.stop, *self.prompt_builder.stop_sequences)))
        return BuiltPrompt(tuple(token_ids), text, stops)

    def grammar(
        self, response_format: ResponseFormat | None, tool_choice: ToolChoice | None = None, field: str | None = None
    ) -> Grammar | None:
        """The compiled grammar an answer must follow, or None (unconstrained). A schema the grammar
        library cannot compile is a RequestValidationError naming `field` and what it cannot do."""
        source = grammar_source(response_format, tool_choice)
        if source is None:
            return None
        try:
            return self.model.grammar_tokenizer().compile(source)
        except GrammarError as error:
            raise self._grammar_problem(tool_choice, error, field) from None

    def _grammar_problem(self, tool_choice: ToolChoice | None, error: GrammarError, field: str | None) -> RequestValidationError:
        """Which schema the grammar library refused, and why (its message names the keyword)."""
        if tool_choice is not None:
            for index, tool in enumerate(tool_choice.tools):
                single = ToolChoice((tool,), "required", parallel=False)
                try:
                    self.model.grammar_tokenizer().compile(grammar_source(None, single))
                except GrammarError as tool_error:
                    return RequestValidationError(
                        f"the parameters schema of tool {tool.name!r} cannot be used for constrained decoding: {tool_error}",
                        f"tools[{index}].function.parameters",
                    )
        return RequestValidationError(f"the response_format schema cannot be used for constrained decoding: {error}", field)

    def start(self, prompt: BuiltPrompt, config: GenerationConfig, grammar: Grammar | None = None) -> list[TokenStream]:
        """Submit `num_return_sequences` sequences for the prompt to the engine, each constrained by `grammar`."""
        streams: list[TokenStream] = []
        try:
            for index in range(config.num_return_sequences):
                params = sampling_params(config, index, self.model.info.eos_token_ids)
                streams.append(self.model.engine.submit(GenerationRequest(prompt.token_ids, params, grammar)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def collect_completion(self, stream: TokenStream, prompt: BuiltPrompt) -> Completion:
        """Read a stream to its end (or to a stop sequence, then cancel it)."""
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
        return Completion(pieces.text, _finish_reason(stream, pieces.stopped), count)

    def complete_all(
        self, jobs: list[tuple[BuiltPrompt, GenerationConfig]], grammars: list[Grammar | None] | None = None
    ) -> list[list[Completion]]:
        """Submit every job's sequences first (so an engine can batch them), then collect them in order."""
        started: list[tuple[BuiltPrompt, list[TokenStream]]] = []
        grammars = grammars if grammars is not None else [None] * len(jobs)
        try:
            for (prompt, config), grammar in zip(jobs, grammars, strict=True):
                started.append((prompt, self.start(prompt, config, grammar)))
            return [[self.collect_completion(s, prompt) for s in streams] for prompt, streams in started]
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
        jobs, grammars = [], []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]")
            conversation = conversation_from_dream(item.prompt, item.dialog_context)
            jobs.append((self.build_prompt(conversation, config, f"dialog_contexts[{index}]"), config))
            grammars.append(self.grammar(config.response_format, None, f"configs[{index}].response_format"))
        return [[c.text.strip() for c in completions] for completions in self.complete_all(jobs, grammars)]

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
        """One short greedy generation, so the first real request pays no first-call costs; then the
        vocabulary for constrained decoding is built (about a second), so no request waits for it."""
        config = GenerationConfig(max_new_tokens=2, num_return_sequences=1)
        prompt = self.build_prompt(conversation_from_dream("", ["Hello!"]), config, None)
        text = self.complete_all([(prompt, config)])[0][0].text
        try:
            self.model.grammar_tokenizer()
        except GrammarError as error:
            logger.warning("constrained decoding is unavailable: %s", error)
        return text

