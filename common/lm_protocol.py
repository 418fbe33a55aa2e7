"""Wire models of Dream's LLM endpoints (`/respond`, `/generate_goals`) and their generation config.

Shared by every LLM service (local transformers, OpenAI-compatible upstreams), so it imports
pydantic only — never torch. Dream's parallel request lists are parsed here, at the edge, into one
object per item; lists of different lengths are a `RequestValidationError` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Hard bounds that no deployment may raise; the per-service caps (`GenerationCaps`) sit below them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 200


class RequestValidationError(ValueError):
    """Bad input from a client: the message says what is wrong, `field` where (e.g. `configs[0].top_p`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


# Parts of a pydantic error location that name a union's member type, not a field:
# ('messages', 0, 'content', 'str') is the field messages[0].content.
_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "bytes", "none", "function-after", "function-before"}


def field_path(location: Iterable[Any]) -> str | None:
    """A pydantic error location as a field path: ('configs', 0, 'top_p') -> 'configs[0].top_p'."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part) in _UNION_MEMBER_TAGS or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def validation_error_to_request_error(error: ValidationError, prefix: str = "") -> RequestValidationError:
    """The first problem pydantic found, as one `RequestValidationError` with its field path."""
    first = error.errors(include_url=False)[0]
    original = (first.get("ctx") or {}).get("error")
    if isinstance(original, RequestValidationError):
        # A cross-field check of ours: it already knows its field, relative to its model.
        nested = field_path(first["loc"])
        field = ".".join(part for part in (prefix, nested, original.field) if part) or None
        return RequestValidationError(original.message, field)
    field = field_path(first["loc"])
    if prefix:
        field = f"{prefix}.{field}" if field and not field.startswith("[") else f"{prefix}{field or ''}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key; allowed keys: " + ", ".join(_allowed_keys_for(first["loc"]))
    elif first["type"] == "missing":
        message = "this field is required"
    return RequestValidationError(f"{field}: {message}" if field else message, field)


def _allowed_keys_for(location: tuple) -> list[str]:
    # Unknown keys only matter inside generation configs; other models list their own fields.
    if "configs" in location or "generation_config" in location:
        return sorted(GenerationConfig.model_fields)
    return []


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """Validate `data` (already JSON-decoded) into `model`; bad input raises RequestValidationError."""
    if not isinstance(data, dict):
        raise RequestValidationError("the request body must be a JSON object", None)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error_to_request_error(error) from None


@dataclass(frozen=True)
class GenerationCaps:
    """Per-deployment upper bounds on what a request may ask for (settings of the service)."""

    max_new_tokens: int = 1024
    max_num_return_sequences: int = 8


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


def load_generation_config(path: Path | str, model: type[GenerationConfig] = GenerationConfig) -> GenerationConfig:
    """A generative config file (JSON object of `model`'s keys: GenerationConfig or a service's subclass), validated."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RequestValidationError(f"generative config file {str(path)!r} does not exist", "GENERATIVE_CONFIG") from None
    except json.JSONDecodeError as error:
        raise RequestValidationError(f"generative config file {str(path)!r} is not JSON: {error}", "GENERATIVE_CONFIG") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problem = validation_error_to_request_error(error)
        raise RequestValidationError(f"generative config file {str(path)!r}: {problem.message}", "GENERATIVE_CONFIG") from None


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
