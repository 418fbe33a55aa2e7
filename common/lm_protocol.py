"""Wire models of Dream's LLM endpoints (`/respond`, `/generate_goals`) and their generation config.

Shared by every LLM service (local transformers, OpenAI-compatible upstreams), so it imports
pydantic only — never torch. Dream's parallel request lists are parsed here, at the edge, into one
object per item; lists of different lengths are a `RequestValidationError` naming the field.

Dream's files are taken as they are:
- a generation config may hold every key of Dream's shipped generative configs and of
  transformers' `generate` that a service can honour (`GenerationConfig`), OpenAI's names for two
  of them (`max_tokens`, `n`) and Anthropic's `max_tokens_to_sample`; a `generate` keyword that no
  Parley service honours is a 400 saying so and what to use instead (`UNSUPPORTED_GENERATION_KEYS`),
  never dropped silently;
- a request may carry Dream's *sending variables* at its top level: `<name>s: [value, ...]`, as
  Dream's skills send the env vars they forward and a turn's `lm_service_kwargs`, and
  `<NAME>_list: [value, ...]`, as its older skills did (`SendingVariables`). A service uses those it
  needs (the OpenAI-API service: the upstream key and organization) and ignores the rest; their
  values are never logged, shown or stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from common.settings_support import REPO_ROOT, SettingsError
from common.validation import RequestValidationError, problems

# The generative config an LLM service merges requests over when its card names none (repository-relative).
DEFAULT_GENERATIVE_CONFIG = "common/generative_configs/default_generative_config.json"
# What `/generate_goals` asks an LLM: this file's text with the bot's prompt in its `{prompt}` slot.
GOALS_PROMPT_FILE = REPO_ROOT / "common" / "prompts" / "generate_goals.txt"
# Hard bounds that no deployment may raise; the per-service caps (`GenerationCaps`) sit below them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 200
MAX_END_TOKEN_IDS = 16
MAX_REPLACEMENT_PAIRS = 16

# Other names for generation keys: OpenAI's (Dream's OpenAI configs) and Anthropic's.
GENERATION_KEY_ALIASES = {
    "max_tokens": "max_new_tokens",
    "max_tokens_to_sample": "max_new_tokens",
    "n": "num_return_sequences",
}

# transformers `generate` keywords that no Parley LLM service honours, and what to use instead.
_USE_SAMPLING = "use top_p, top_k or typical_p (with do_sample: true)"
_NOT_FOR_TEXT = "leave it out: /respond answers text, not tensors"
_LEAVE_OUT = "leave it out: the engine manages its own batches and cache"
UNSUPPORTED_GENERATION_KEYS: dict[str, str] = {
    "min_p": _USE_SAMPLING,
    "epsilon_cutoff": _USE_SAMPLING,
    "eta_cutoff": _USE_SAMPLING,
    "top_h": _USE_SAMPLING,
    "num_beam_groups": "diverse beam search is not supported; use num_beams, or do_sample with num_return_sequences",
    "diversity_penalty": "diverse beam search is not supported; use num_beams, or do_sample with num_return_sequences",
    "constraints": "constrained beam search is not supported; use stop to cut the text",
    "force_words_ids": "constrained beam search is not supported; use stop to cut the text",
    "penalty_alpha": "contrastive search is not supported; use repetition_penalty or no_repeat_ngram_size",
    "dola_layers": "DoLa decoding is not supported; use repetition_penalty or no_repeat_ngram_size",
    "encoder_repetition_penalty": "for encoder-decoder models; use repetition_penalty",
    "encoder_no_repeat_ngram_size": "for encoder-decoder models; use no_repeat_ngram_size",
    "bad_words_ids": "token bans are not supported; use no_repeat_ngram_size, or stop to cut the text",
    "suppress_tokens": "token bans are not supported; use stop to cut the text",
    "begin_suppress_tokens": "token bans are not supported; use min_new_tokens",
    "sequence_bias": "token biases are not supported; use repetition_penalty, frequency_penalty or presence_penalty",
    "forced_bos_token_id": "leave it out: the prompt already starts as the model expects",
    "forced_eos_token_id": "use eos_token_id, or max_new_tokens",
    "exponential_decay_length_penalty": "use max_new_tokens, or length_penalty with num_beams",
    "stop_strings": "use stop",
    "max_time": "use max_new_tokens (and the client's own timeout)",
    "renormalize_logits": "leave it out: probabilities are always normalised before sampling",
    "remove_invalid_values": "leave it out: the engine never samples NaN or infinite values",
    "guidance_scale": "classifier-free guidance is not supported; leave it out",
    "watermarking_config": "watermarking is not supported; leave it out",
    "token_healing": "token healing is not supported; leave it out",
    "low_memory": _LEAVE_OUT,
    "use_cache": _LEAVE_OUT,
    "cache_implementation": _LEAVE_OUT,
    "cache_config": _LEAVE_OUT,
    "compile_config": _LEAVE_OUT,
    "pad_token_id": _LEAVE_OUT + " (nothing is padded)",
    "bos_token_id": "leave it out: the prompt already starts as the model expects",
    "decoder_start_token_id": "for encoder-decoder models; leave it out",
    "output_scores": _NOT_FOR_TEXT,
    "output_logits": _NOT_FOR_TEXT,
    "output_attentions": _NOT_FOR_TEXT,
    "output_hidden_states": _NOT_FOR_TEXT,
    "return_dict_in_generate": _NOT_FOR_TEXT,
    "assistant_model": "assisted generation is not supported; leave it out",
    "prompt_lookup_num_tokens": "assisted generation is not supported; leave it out",
    "num_assistant_tokens": "assisted generation is not supported; leave it out",
    "logits_processor": "Python objects cannot be sent; use the config's keys",
    "stopping_criteria": "Python objects cannot be sent; use stop, eos_token_id or max_new_tokens",
    "streamer": "Python objects cannot be sent; use /v1/chat/completions with stream: true",
}


@dataclass(frozen=True)
class GenerationCaps:
    """Per-deployment upper bounds on what a request may ask for (settings of the service)."""

    max_new_tokens: int = 1024
    max_num_return_sequences: int = 8


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: a named JSON schema the answer must validate against."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the schema's name")
    description: str | None = Field(None, description="what the answer is for")
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="the JSON schema")
    strict: bool | None = Field(None, description="accepted for compatibility: answers always follow the schema")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that validates against a schema.

    A JSON answer is guaranteed by constrained decoding where the service generates it itself."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema")
    json_schema: JsonSchemaFormat | None = Field(None, description="the schema, for type json_schema")

    @model_validator(mode="after")
    def _schema_goes_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise RequestValidationError("response_format of type json_schema needs json_schema", "json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise RequestValidationError(f"json_schema is only for type json_schema, not {self.type}", "json_schema")
        return self

    @property
    def constrains(self) -> bool:
        return self.type != "text"

    def to_openai(self) -> dict[str, Any]:
        """The wire form OpenAI's API takes."""
        return self.model_dump(by_alias=True, exclude_none=True)


ReplacementPair = Annotated[list[str], Field(min_length=2, max_length=2)]


class GenerationConfig(BaseModel):
    """Every generation key an LLM service accepts in a Dream config; unknown keys are an error.

    Defaults are the neutral values; a service's default config (a JSON file in
    `common/generative_configs/`) and then the request's config are merged over them with
    `merged_with`. Types are strict: `"5"` is not a number and `1` is not `true`.

    Lengths as transformers has them: `max_new_tokens` bounds the answer, `max_length` the prompt
    and the answer together; a config that sets `max_length` without `max_new_tokens` (Dream's
    transformers_lm test does) bounds the total, and when one config sets both, `max_new_tokens`
    wins, as in transformers. The same holds for `min_new_tokens` and `min_length`.
    `resolved_for_prompt` turns the totals into new-token counts once the prompt is known.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(120, ge=1, description="most tokens to generate")
    max_length: int | None = Field(
        None, ge=1, description="transformers': most tokens of prompt and answer together (instead of max_new_tokens)"
    )
    min_new_tokens: int = Field(0, ge=0, description="fewest tokens before an end-of-sequence may end the text")
    min_length: int | None = Field(
        None, ge=0, description="transformers': fewest tokens of prompt and answer together before an end token may end it"
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="sampling temperature; 0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 turns it off")
    typical_p: float = Field(
        1.0, gt=0.0, le=1.0,
        description="transformers' typical sampling: keep the tokens whose surprise is closest to the expected one, "
        "up to this probability mass; 1 turns it off",
    )
    do_sample: bool = Field(False, description="sample (true) or decode greedily (false)")
    num_return_sequences: int = Field(1, ge=1, description="hypotheses per dialog")
    num_beams: int = Field(
        1, ge=1,
        description="beam search over this many beams (transformers'); the best num_return_sequences finished "
        "hypotheses come back; with do_sample, transformers' beam sample",
    )
    length_penalty: float = Field(
        1.0, ge=-10.0, le=10.0,
        description="beam search: a hypothesis's log-probability is divided by its length to this power",
    )
    early_stopping: bool | Literal["never"] = Field(
        False,
        description='beam search: true stops once num_beams hypotheses finished, false when none is likely to '
        'improve, "never" only when none can',
    )
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="penalty on tokens already present")
    no_repeat_ngram_size: int = Field(
        0, ge=0, le=64, description="no n-gram of this size occurs twice in the prompt and the answer; 0 turns it off"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from a token's logit once per time it was generated"
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from the logit of every token generated so far"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES, description="cut the text here")
    response_format: ResponseFormat | None = Field(
        None, description='OpenAI\'s: {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}} for JSON answers'
    )
    eos_token_id: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, max_length=MAX_END_TOKEN_IDS,
        description="token ids (one, or a list) that also end a hypothesis, besides the model's own end tokens",
    )
    replacement: list[ReplacementPair] = Field(
        default_factory=list, max_length=MAX_REPLACEMENT_PAIRS,
        description="Dream's [text, stand-in] pairs: each text in the prompt is written as its stand-in "
        "(and a space), and each stand-in in a hypothesis is turned back into the text",
    )

    @model_validator(mode="before")
    @classmethod
    def _dream_names(cls, data: Any, info: ValidationInfo) -> Any:
        """Other names for our keys, a refusal for `generate` keys no service honours, and
        transformers' precedence of max_new_tokens over max_length within one config."""
        if not isinstance(data, dict) or (info.context or {}).get("merging"):
            return data
        data = dict(data)
        for key in data:
            if key in UNSUPPORTED_GENERATION_KEYS:
                raise RequestValidationError(
                    f"{key} is not supported by this service: {UNSUPPORTED_GENERATION_KEYS[key]}", key
                )
        for other_name, name in GENERATION_KEY_ALIASES.items():
            if other_name in data:
                if name in data:
                    raise RequestValidationError(f"give {name} or {other_name}, not both", other_name)
                data[name] = data.pop(other_name)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        if isinstance(data.get("eos_token_id"), int) and not isinstance(data["eos_token_id"], bool):
            data["eos_token_id"] = [data["eos_token_id"]]
        for new_tokens, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            if new_tokens in data and data.get(total) is not None:
                data[total] = None  # transformers: the new-token count wins
        return data

    @field_validator("stop")
    @classmethod
    def _stop_sequences_are_usable(cls, stop: list[str]) -> list[str]:
        for index, sequence in enumerate(stop):
            if not sequence or len(sequence) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"stop[{index}] must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters")
        return stop

    @field_validator("replacement")
    @classmethod
    def _replacement_pairs_are_usable(cls, pairs: list[list[str]]) -> list[list[str]]:
        for index, pair in enumerate(pairs):
            if not all(pair) or max(len(text) for text in pair) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"replacement[{index}]: both texts must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters")
        return pairs

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """The keys a config may hold (for the message of an unknown key)."""
        return sorted({*cls.model_fields, *GENERATION_KEY_ALIASES})

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def merged_with(self, override: "GenerationConfig | None") -> "GenerationConfig":
        """This config with the keys that `override` set explicitly replaced by the override's.

        A new-token count the override sets replaces a total this config has (and a total it sets
        takes over from this config's new-token count, since a total that is set decides).
        """
        if override is None:
            return self
        given = override.model_dump(exclude_unset=True)
        for new_tokens, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            if new_tokens in override.model_fields_set and total not in override.model_fields_set:
                given[total] = None
        values = {**self.model_dump(), **given}
        # type(self): a service's subclass (extra keys such as OpenAI's penalties) stays itself.
        return type(self).model_validate(values, context={"merging": True})

    def check_caps(self, caps: GenerationCaps, field_prefix: str = "") -> None:
        """Raise RequestValidationError when the config asks for more than the deployment allows,
        or for things that do not go together."""
        prefix = f"{field_prefix}." if field_prefix else ""
        if self.max_new_tokens > caps.max_new_tokens and self.max_length is None:
            raise RequestValidationError(
                f"{prefix}max_new_tokens: {self.max_new_tokens} is above this service's cap of {caps.max_new_tokens}",
                f"{prefix}max_new_tokens",
            )
        for name in ("num_return_sequences", "num_beams"):
            if getattr(self, name) > caps.max_num_return_sequences:
                raise RequestValidationError(
                    f"{prefix}{name}: {getattr(self, name)} is above this service's cap "
                    f"of {caps.max_num_return_sequences}",
                    f"{prefix}{name}",
                )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise RequestValidationError(
                f"{prefix}num_return_sequences: {self.num_return_sequences} is more than num_beams "
                f"({self.num_beams}): beam search returns its best finished beams; raise num_beams",
                f"{prefix}num_return_sequences",
            )

    def resolved_for_prompt(self, prompt_tokens: int, window: int, caps: GenerationCaps, field_prefix: str = "") -> "GenerationConfig":
        """The config with `max_length` / `min_length` (totals) turned into new-token counts for a
        prompt of `prompt_tokens` tokens in a model window of `window` tokens."""
        if self.max_length is None and self.min_length is None:
            return self
        prefix = f"{field_prefix}." if field_prefix else ""
        values = self.model_dump()
        if self.max_length is not None:
            room = min(self.max_length, window) - prompt_tokens
            if room < 1:
                raise RequestValidationError(
                    f"{prefix}max_length: {self.max_length} leaves no room for an answer after the prompt's "
                    f"{prompt_tokens} tokens (max_length counts the prompt too, as in transformers); "
                    "raise it, or bound the answer alone with max_new_tokens",
                    f"{prefix}max_length",
                )
            if room > caps.max_new_tokens:
                raise RequestValidationError(
                    f"{prefix}max_length: {self.max_length} allows {room} new tokens after the prompt's "
                    f"{prompt_tokens}, above this service's cap of {caps.max_new_tokens}",
                    f"{prefix}max_length",
                )
            values["max_new_tokens"] = room
        if self.min_length is not None:
            values["min_new_tokens"] = max(0, self.min_length - prompt_tokens)
        values["max_length"] = values["min_length"] = None
        return type(self).model_validate(values, context={"merging": True})

    # --- Dream's replacement pairs ---------------------------------------------------------------
    def replace_in_prompt(self, text: str) -> str:
        """The prompt as the model sees it: each pair's text written as its stand-in and a space (Dream's rule)."""
        for original, stand_in in self.replacement:
            text = text.replace(original, stand_in + " ")
        return text

    def restore_in_hypothesis(self, text: str) -> str:
        """A hypothesis with each stand-in turned back into its text, and Dream's "\\n " made "\\n"."""
        for original, stand_in in self.replacement:
            text = text.replace(stand_in, original)
        return text.replace("\n ", "\n")


def load_generation_config(
    path: Path | str, model: type[GenerationConfig] = GenerationConfig, setting: str = "GENERATIVE_CONFIG"
) -> GenerationConfig:
    """A generative config file (JSON object of `model`'s keys: GenerationConfig or a service's subclass),
    validated; a file that cannot be used is a SettingsError naming `setting`, read at start-up."""
    path = Path(path)
    where = f"{setting}: generative config file {str(path)!r}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist") from None
    except json.JSONDecodeError as error:
        raise SettingsError(f"{where} is not JSON: {error}") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise SettingsError(f"{where}: {problems(error, model=model)[0].line()}") from None


def load_default_config(
    path: Path | None, caps: GenerationCaps, model: type[GenerationConfig] = GenerationConfig
) -> GenerationConfig:
    """An LLM service's default config (GENERATIVE_CONFIG; unset: `model`'s defaults), checked at start-up:
    a default over the caps would turn every request without a config into a 400, so it is a SettingsError."""
    config = load_generation_config(path, model) if path else model()
    try:
        config.check_caps(caps, "GENERATIVE_CONFIG" if path else "the built-in default config")
    except RequestValidationError as error:
        raise SettingsError(f"{error.message} (MAX_NEW_TOKENS_CAP, MAX_NUM_RETURN_SEQUENCES are the caps)") from None
    return config


def dream_turns(dialog_context: list[str]) -> list[tuple[str, str]]:
    """(role, utterance) for Dream's dialog context: utterances alternate, and the last is the user's,
    so counting back from it every other one is the assistant's (as Dream's LLM services read it)."""
    last = len(dialog_context) - 1
    return [("user" if (last - index) % 2 == 0 else "assistant", text) for index, text in enumerate(dialog_context)]


def goals_request(prompt: str) -> str:
    """The user message `/generate_goals` sends an LLM for one bot prompt (the same in every LLM service)."""
    return GOALS_PROMPT_FILE.read_text().strip().replace("{prompt}", prompt)


# Utterances and prompts are plain strings; the bounds keep one request from exhausting memory
# before the body-size limit would (that limit is the service's MAX_REQUEST_BYTES).
Utterance = str

# Dream's sending variables: `openai_api_keys`, `openai_organizations`, `<lm_service_kwargs key>s`,
# and the older `OPENAI_API_KEY_list`; each holds a list (one value per dialog, or one for all).
SENDING_VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(?:s|_list)$")
_SENDING_VARIABLES_FIELD = "sending_variables"


class SendingVariables:
    """Dream's top-level per-request variables, by name; a value is never shown (`repr` names only)."""

    def __init__(self, values: dict[str, list | None] | None = None):
        self._values = dict(values or {})

    def get(self, name: str) -> list | None:
        return self._values.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SendingVariables(names={sorted(self._values)})"


def _sending_variables_schema(schema: dict[str, Any]) -> None:
    """The OpenAPI document's word for them: top-level names that match, holding a list."""
    schema["patternProperties"] = {
        SENDING_VARIABLE_NAME.pattern: {
            "type": ["array", "null"],
            "description": "Dream's sending variables (`openai_api_keys: [key]`, `<lm_service_kwargs key>s: [value]`, "
            "`<ENV_VAR>_list: [value]`): one value per dialog or one for all; used by the services that need them "
            "(the OpenAI-API LLM: its upstream key and organization), ignored by the others, never logged",
        }
    }


class _DreamLMRequest(BaseModel):
    """What Dream's `/respond` and `/generate_goals` share: strict fields, and the sending variables."""

    model_config = ConfigDict(
        extra="forbid", strict=True, arbitrary_types_allowed=True, json_schema_extra=_sending_variables_schema
    )

    sending_variables: SkipJsonSchema[SendingVariables] = Field(
        default_factory=SendingVariables, exclude=True, repr=False
    )

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """The keys a request may hold (for the message of an unknown key)."""
        return [*sorted(set(cls.model_fields) - {_SENDING_VARIABLES_FIELD}), "and Dream's sending variables (<name>s: [...])"]

    @model_validator(mode="before")
    @classmethod
    def _take_sending_variables(cls, data: Any) -> Any:
        """Top-level fields that are not ours but are named and shaped like Dream's sending variables
        are taken aside; anything else unknown stays, to be refused by name."""
        if not isinstance(data, dict):
            return data
        if _SENDING_VARIABLES_FIELD in data:
            raise RequestValidationError("unknown key", _SENDING_VARIABLES_FIELD)
        fields = set(cls.model_fields) - {_SENDING_VARIABLES_FIELD}
        kept, taken = {}, {}
        for name, value in data.items():
            is_sending_variable = isinstance(name, str) and name not in fields and SENDING_VARIABLE_NAME.match(name)
            if is_sending_variable and (value is None or isinstance(value, list)):
                taken[name] = value
            else:
                kept[name] = value
        return {**kept, _SENDING_VARIABLES_FIELD: SendingVariables(taken)}


class RespondItem(BaseModel):
    """One dialog to answer: its utterances (oldest first, the user's last), the prompt, the config."""

    model_config = ConfigDict(frozen=True)

    dialog_context: list[Utterance]
    prompt: str = ""
    config: GenerationConfig | None = None


class RespondRequest(_DreamLMRequest):
    """`POST /respond`: Dream's three parallel lists; `configs` and `prompts` may be left out."""

    dialog_contexts: list[list[Utterance]] = Field(min_length=1)
    prompts: list[str] | None = None
    configs: list[GenerationConfig | None] | None = None

    @model_validator(mode="after")
    def _lists_line_up(self) -> "RespondRequest":
        count = len(self.dialog_contexts)
        for index, context in enumerate(self.dialog_contexts):
            if not context:
                raise RequestValidationError(
                    f"dialog_contexts[{index}] is empty: a dialog needs at least the user's last utterance",
                    f"dialog_contexts[{index}]",
                )
        for name in ("prompts", "configs"):
            values = getattr(self, name)
            if values is not None and len(values) != count:
                raise RequestValidationError(
                    f"{name} has {len(values)} items but dialog_contexts has {count}: give one per dialog",
                    name,
                )
        return self

    def items(self) -> list[RespondItem]:
        """One object per dialog, so nothing downstream zips parallel lists."""
        prompts = self.prompts if self.prompts is not None else [""] * len(self.dialog_contexts)
        configs = self.configs if self.configs is not None else [None] * len(self.dialog_contexts)
        return [
            RespondItem(dialog_context=context, prompt=prompt, config=config)
            for context, prompt, config in zip(self.dialog_contexts, prompts, configs, strict=True)
        ]


class GenerateGoalsItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str
    config: GenerationConfig | None = None


class GenerateGoalsRequest(_DreamLMRequest):
    """`POST /generate_goals`: for each prompt, a short description of what a bot with it can do."""

    prompts: list[str] = Field(min_length=1)
    configs: list[GenerationConfig | None] | None = None

    @model_validator(mode="after")
    def _lists_line_up(self) -> "GenerateGoalsRequest":
        if self.configs is not None and len(self.configs) != len(self.prompts):
            raise RequestValidationError(
                f"configs has {len(self.configs)} items but prompts has {len(self.prompts)}: give one per prompt",
                "configs",
            )
        return self

    def items(self) -> list[GenerateGoalsItem]:
        configs = self.configs if self.configs is not None else [None] * len(self.prompts)
        return [GenerateGoalsItem(prompt=p, config=c) for p, c in zip(self.prompts, configs, strict=True)]


# `/respond` answers one list of hypotheses per dialog; `/generate_goals` one string per prompt.
RespondResponse = list[list[str]]
GenerateGoalsResponse = list[str]
