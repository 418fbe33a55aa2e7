"""The work of the LLM service, free of HTTP: configs merged and checked, prompts built, hypotheses generated.

`LMService` wraps a `LoadedModel`; `/respond`, `/generate_goals` and the OpenAI endpoints all go
through `LMService.start` (prompt → token streams) and read the streams with
`collect_completion` or `stream_pieces`, which is where the service's LLM metrics are taken (each
token as its reader gets it: what was served, not what the engine computed).

A config is merged over the model name's default and checked (`config_for`), then fitted to its
prompt (`build_prompt`: `max_length` / `min_length` become new-token counts, Dream's replacement
pairs rewrite the prompt). `num_beams` > 1 runs the engine's beam search: one request, `num_beams` rows.
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
from common.metrics import LLMMetrics, SequenceTimer, ServiceMetrics
from services.transformers_lm.backends import ChatMessage, LoadedModel
from services.transformers_lm.engines import (
    BeamSearchParams,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenStream,
)
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
from services.transformers_lm.settings import ModelVariant, PromptFormat, Settings, SettingsError
from services.transformers_lm.structured_output import ToolChoice, grammar_source

logger = logging.getLogger(__name__)


class GenerationFailedError(RuntimeError):
    """Generation failed inside the engine: a failure of ours (500), not of the request."""


class ModelNotFoundError(LookupError):
    """The request names a model this service does not serve (404)."""

    def __init__(self, requested: str, served: list[str]):
        super().__init__(f"The model '{requested}' does not exist here; this service serves: {', '.join(served)}")
        self.message = str(self)
        self.field = "model"


@dataclass(frozen=True)
class Completion:
    """One finished hypothesis: its text (cut at stop sequences), why it ended, and its token count."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


def choose_renderer(model: LoadedModel, settings: Settings, prompt_format: PromptFormat | None = None) -> PromptRenderer:
    """A prompt_format (a named variant's, else the settings'), else the model's chat template, else Dream's plain format."""
    prompt_format = prompt_format or settings.prompt_format
    if prompt_format is not None:
        return PromptFormatRenderer(prompt_format)
    if model.has_chat_template:
        return ChatTemplateRenderer(model.render_chat, takes_tools=model.chat_template_takes_tools)
    return PlainRenderer(settings.language)


def special_stop_token_ids(model: LoadedModel, stop_sequences: tuple[str, ...]) -> tuple[int, ...]:
    """The ids of the stop strings that are one special token (<|im_end|>, <|eot_id|>): decoded text
    never holds such a token, so it can only end generation by its id."""
    prefix = model.encode("")  # the BOS a tokenizer adds to every prompt, if any
    found = []
    for stop in stop_sequences:
        token_ids = model.encode(stop)
        if token_ids[: len(prefix)] == prefix:
            token_ids = token_ids[len(prefix) :]
        if len(token_ids) == 1 and model.decode(token_ids) == "":
            found.append(token_ids[0])
    return tuple(found)


@dataclass(frozen=True)
class ServedName:
    """A model name this service answers to, and what a request under it gets: its prompt builder
    (template, system prompt, stops) and its default generation config."""

    name: str
    prompt_builder: PromptBuilder
    default_config: GenerationConfig

    @property
    def renderer(self) -> PromptRenderer:
        return self.prompt_builder.renderer


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

    def __init__(self, model: LoadedModel, settings: Settings, default_config: GenerationConfig,
                 metrics: LLMMetrics | None = None):
        self.model = model
        self.settings = settings
        self.default_config = default_config
        self.metrics = metrics or LLMMetrics(ServiceMetrics(), settings.served_model_names[0])
        self.metrics.read_engine_load(model.engine.load)
        self.default = self._served_name(settings.default_model_name, ModelVariant())
        self.renderer = self.default.renderer
        self.prompt_builder = self.default.prompt_builder
        self.names: dict[str, ServedName] = {name: self.default for name in settings.served_model_names}
        for name, variant in settings.model_names.items():
            self.names[name] = self._served_name(name, variant)

    def _served_name(self, name: str, variant: ModelVariant) -> ServedName:
        stops = (*variant.stop, *self.settings.stop_sequences, *self.model.info.extra_stop_sequences)
        stop_ids = tuple(sorted({*self.model.info.eos_token_ids, *special_stop_token_ids(self.model, stops)}))
        builder = PromptBuilder(
            renderer=choose_renderer(self.model, self.settings, variant.prompt_format),
            encode=self.model.encode,
            context_length=self.model.info.context_length,
            stop_sequences=tuple(dict.fromkeys(stops)),
            stop_token_ids=stop_ids,
            system_prompt=variant.system_prompt or "",
        )
        config = self.default_config.merged_with(variant.generation_config)
        try:
            config.check_caps(self.settings.caps, f"MODEL_NAMES.{name}.generation_config")
        except RequestValidationError as error:
            raise SettingsError(f"{error.message} (MAX_NEW_TOKENS_CAP, MAX_NUM_RETURN_SEQUENCES are the caps)") from None
        return ServedName(name, builder, config)

    # --- building blocks ----------------------------------------------------------------------
    def served(self, name: str | None) -> ServedName:
        """The settings of a model name (None: the model's own); ModelNotFoundError for another name."""
        if name is None:
            return self.default
        try:
            return self.names[name]
        except KeyError:
            raise ModelNotFoundError(name, list(self.names)) from None

    def config_for(
        self, override: GenerationConfig | None, field: str | None, served: ServedName | None = None, *, length_is_a_ceiling: bool = False
    ) -> GenerationConfig:
        """The request's config merged over the name's default, checked against the caps and the model.

        With `length_is_a_ceiling` (Dream's /respond), a max_new_tokens above the service's cap is
        lowered to the cap instead of refused: Dream's shipped configs are written for larger models
        (2048 or 4096 new tokens) and its skills send them as they are, as a most, not a demand.
        """
        config = (served or self.default).default_config.merged_with(override)
        cap = self.settings.caps.max_new_tokens
        if length_is_a_ceiling and config.max_length is None and config.max_new_tokens > cap:
            config = config.model_copy(update={"max_new_tokens": cap})
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
        if config.num_beams > 1 and config.response_format is not None and config.response_format.constrains:
            raise RequestValidationError(
                f"{prefix}num_beams: a beam search cannot follow a response_format; ask for one beam", f"{prefix}num_beams"
            )
        return config

    def build_prompt(
        self,
        conversation: Conversation,
        config: GenerationConfig,
        field: str | None,
        served: ServedName | None = None,
        config_field: str | None = None,
    ) -> tuple[BuiltPrompt, GenerationConfig]:
        """The prompt for the conversation, and the config fitted to it (lengths as new-token counts)."""
        builder = (served or self.default).prompt_builder
        prompt = builder.build(
            conversation,
            config.max_new_tokens,
            tuple(config.stop),
            field,
            max_length=config.max_length,
            rewrite=config.replace_in_prompt if config.replacement else None,
        )
        return prompt, self._fit(prompt, config, config_field)

    def build_raw_prompt(
        self, text: str, config: GenerationConfig, field: str | None, served: ServedName | None = None
    ) -> tuple[BuiltPrompt, GenerationConfig]:
        """A completion prompt used as is (OpenAI's /v1/completions), checked against the window."""
        token_ids = self.model.encode(text)
        if not token_ids:
            raise RequestValidationError("the prompt is empty", field)
        new_tokens = 1 if config.max_length is not None else config.max_new_tokens
        if len(token_ids) + new_tokens > self.model.info.context_length:
            raise ContextLengthExceededError(
                f"the prompt's {len(token_ids)} tokens plus {new_tokens} new tokens exceed the "
                f"model's window of {self.model.info.context_length}",
                field,
            )
        builder = (served or self.default).prompt_builder
        stops = tuple(dict.fromkeys((*config.stop, *builder.stop_sequences)))
        prompt = BuiltPrompt(tuple(token_ids), text, stops, 0, builder.stop_token_ids)
        return prompt, self._fit(prompt, config, None)

    def _fit(self, prompt: BuiltPrompt, config: GenerationConfig, config_field: str | None) -> GenerationConfig:
        return config.resolved_for_prompt(
            len(prompt.token_ids), self.model.info.context_length, self.settings.caps, config_field or ""
        )

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
        """Submit the prompt's sequences to the engine: `num_return_sequences` of them, each constrained
        by `grammar`, or one beam search (which config_for keeps apart from grammars)."""
        engine = self.model.engine
        stop_token_ids = prompt.stop_token_ids or self.model.info.eos_token_ids
        beam = beam_search_params(config)
        if beam is not None:
            params = sampling_params(config, 0, stop_token_ids)
            streams = engine.submit_beam_search(GenerationRequest(prompt.token_ids, params, beam=beam))
            self.metrics.prompt_submitted(len(prompt.token_ids))
            return streams
        streams = []
        try:
            for index in range(config.num_return_sequences):
                params = sampling_params(config, index, stop_token_ids)
                streams.append(engine.submit(GenerationRequest(prompt.token_ids, params, grammar)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        self.metrics.prompt_submitted(len(prompt.token_ids))
        return streams

    def _finish_timer(self, timer: SequenceTimer, stream: TokenStream, reason: str, prompt: BuiltPrompt) -> None:
        timer.finish(reason, admitted_at=stream.admitted_at, prompt_tokens=len(prompt.token_ids),
                     cached_prompt_tokens=stream.cached_prompt_tokens)

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
        text = pieces.final_text() if pieces.transform is not None else pieces.text
        return Completion(text, reason, count)

    def complete_all(
        self, jobs: list[tuple[BuiltPrompt, GenerationConfig]], grammars: list[Grammar | None] | None = None
    ) -> list[list[Completion]]:
        """Submit every job's sequences first (so an engine can batch them), then collect them in order."""
        started: list[tuple[BuiltPrompt, list[TokenStream]]] = []
        grammars = grammars if grammars is not None else [None] * len(jobs)
        try:
            for (prompt, config), grammar in zip(jobs, grammars, strict=True):
                started.append((prompt, self.start(prompt, config, grammar)))
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
    def dream_jobs(self, items: list[RespondItem], served: ServedName | None = None) -> list[tuple[BuiltPrompt, GenerationConfig]]:
        """Each dialog's prompt and config, every one checked before anything is generated."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]", served, length_is_a_ceiling=True)
            conversation = conversation_from_dream(item.prompt, item.dialog_context)
            jobs.append(self.build_prompt(conversation, config, f"dialog_contexts[{index}]", served, f"configs[{index}]"))
        return jobs

    def respond(self, items: list[RespondItem]) -> list[list[str]]:
        """Hypotheses for each dialog (under the model's own name): every item is checked before any generation starts."""
        jobs = self.dream_jobs(items)
        grammars = [self.grammar(config.response_format, None, f"configs[{index}].response_format") for index, (_, config) in enumerate(jobs)]
        return [[c.text.strip() for c in completions] for completions in self.complete_all(jobs, grammars)]

    def generate_goals(self, items: list[GenerateGoalsItem]) -> list[str]:
        """For each prompt, a short description of what a bot with that prompt can do."""
        jobs = []
        for index, item in enumerate(items):
            config = self.config_for(item.config, f"configs[{index}]").merged_with(
                GenerationConfig(num_return_sequences=1)
            )
            conversation = Conversation("", (ChatMessage("user", goals_request(item.prompt)),))
            jobs.append(self.build_prompt(conversation, config, f"prompts[{index}]", None, f"configs[{index}]"))
        return [completions[0].text.strip() for completions in self.complete_all(jobs)]

    def rendering(self, served: ServedName, prompt: BuiltPrompt, config: GenerationConfig) -> dict:
        """What a request would be generated from, without generating: `/render` and `/v1/render`."""
        return {
            "model": served.name,
            "prompt": prompt.text,
            "prompt_tokens": len(prompt.token_ids),
            "token_ids": list(prompt.token_ids),
            "dropped_turns": prompt.dropped_turns,
            "stop": list(prompt.stop_sequences),
            "stop_token_ids": list(prompt.stop_token_ids),
            "generation_config": config.model_dump(),
        }

    def warm_up(self) -> str:
        """One short greedy generation, so the first real request pays no first-call costs; then the
        vocabulary for constrained decoding is built (about a second), so no request waits for it. It
        runs before the service serves (no request runs beside it) and is not counted in the metrics."""
        config = GenerationConfig(max_new_tokens=2, num_return_sequences=1)
        job = self.build_prompt(conversation_from_dream("", ["Hello!"]), config, None)
        served_metrics, self.metrics = self.metrics, LLMMetrics(ServiceMetrics(), "warm-up")
        try:
            text = self.complete_all([job])[0][0].text
        finally:
            self.metrics = served_metrics
        try:
            self.model.grammar_tokenizer()
        except GrammarError as error:
            logger.warning("constrained decoding is unavailable: %s", error)
        return text

