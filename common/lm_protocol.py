"""Wire models of Dream's LLM endpoints (`/respond`, `/generate_goals`) and their generation config.

Shared by every LLM service (local transformers, OpenAI-compatible upstreams), so it imports
pydantic only — never torch. Dream's parallel request lists are parsed here, at the edge, into one
object per item; lists of different lengths are a `RequestValidationError` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.settings_support import REPO_ROOT, SettingsError
from common.validation import RequestValidationError, problems

# The generative config an LLM service merges requests over when its card names none (repository-relative).
DEFAULT_GENERATIVE_CONFIG = "common/generative_configs/default_generative_config.json"
# What `/generate_goals` asks an LLM: this file's text with the bot's prompt in its `{prompt}` slot.
GOALS_PROMPT_FILE = REPO_ROOT / "common" / "prompts" / "generate_goals.txt"
# Hard bounds that no deployment may raise; the per-service caps (`GenerationCaps`) sit below them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 200


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


class GenerationConfig(BaseModel):
    """Every generation key an LLM service accepts in a Dream config; unknown keys are an error.

    Defaults are the neutral values; a service's default config (a JSON file in
    `common/generative_configs/`) and then the request's config are merged over them with
    `merged_with`. Types are strict: `"5"` is not a number and `1` is not `true`.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(120, ge=1, description="most tokens to generate")
    min_new_tokens: int = Field(0, ge=0, description="fewest tokens before an end-of-sequence may end the text")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="sampling temperature; 0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 turns it off")
    do_sample: bool = Field(False, description="sample (true) or decode greedily (false)")
    num_return_sequences: int = Field(1, ge=1, description="hypotheses per dialog")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="penalty on tokens already present")
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

    @field_validator("stop")
    @classmethod
    def _stop_sequences_are_usable(cls, stop: list[str]) -> list[str]:
        for index, sequence in enumerate(stop):
            if not sequence or len(sequence) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"stop[{index}] must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters")
        return stop

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def merged_with(self, override: "GenerationConfig | None") -> "GenerationConfig":
        """This config with the keys that `override` set explicitly replaced by the override's."""
        if override is None:
            return self
        values = {**self.model_dump(), **override.model_dump(exclude_unset=True)}
        # type(self): a service's subclass (extra keys such as OpenAI's penalties) stays itself.
        return type(self).model_validate(values)

    def check_caps(self, caps: GenerationCaps, field_prefix: str = "") -> None:
        """Raise RequestValidationError when the config asks for more than the deployment allows."""
        prefix = f"{field_prefix}." if field_prefix else ""
        if self.max_new_tokens > caps.max_new_tokens:
            raise RequestValidationError(
                f"{prefix}max_new_tokens: {self.max_new_tokens} is above this service's cap of {caps.max_new_tokens}",
                f"{prefix}max_new_tokens",
            )
        if self.num_return_sequences > caps.max_num_return_sequences:
            raise RequestValidationError(
                f"{prefix}num_return_sequences: {self.num_return_sequences} is above this service's cap "
                f"of {caps.max_num_return_sequences}",
                f"{prefix}num_return_sequences",
            )


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


class RespondItem(BaseModel):
    """One dialog to answer: its utterances (oldest first, the user's last), the prompt, the config."""

    model_config = ConfigDict(frozen=True)

    dialog_context: list[Utterance]
    prompt: str = ""
    config: GenerationConfig | None = None


class RespondRequest(BaseModel):
    """`POST /respond`: Dream's three parallel lists; `configs` and `prompts` may be left out."""

    model_config = ConfigDict(extra="forbid", strict=True)

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


class GenerateGoalsRequest(BaseModel):
    """`POST /generate_goals`: for each prompt, a short description of what a bot with it can do."""

    model_config = ConfigDict(extra="forbid", strict=True)

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
