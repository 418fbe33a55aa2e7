"""Wire models of this service beyond common/lm_protocol.py: OpenAI's config keys and Dream's key fields.

Dream's `/respond` and `/generate_goals` requests are parsed by the shared models (with Dream's
sending variables taken aside there); this module adds what only an OpenAI upstream needs:

- `OpenAIGenerationConfig`: the shared generation config with OpenAI's ranges and habits
  (temperature up to 2; a temperature without `do_sample` samples), so Dream's OpenAI configs
  (e.g. `{"max_tokens": 256, "temperature": 0.4, ...}`) work unchanged; `to_openai_parameters()`
  turns it into the body of a chat completion request; keys the chat API cannot honour are a 400.
- Dream's per-request key fields (`openai_api_keys`, `openai_organizations`, ...): read from the
  request's sending variables, one per dialog (or one for all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from common.lm_protocol import GenerateGoalsRequest, GenerationCaps, GenerationConfig, RespondRequest, SendingVariables
from common.validation import RequestValidationError, parse_json

# Dream's fields for per-request organizations (its LLM reads the first, its skills send the second).
ORGANIZATION_FIELDS = ("openai_api_organizations", "openai_organizations", "OPENAI_ORGANIZATION_list")


class OpenAIGenerationConfig(GenerationConfig):
    """The shared generation config, with OpenAI's ranges and its extra keys and names.

    OpenAI has no `do_sample`: greedy decoding is sent as `temperature: 0`. A config that sets
    `temperature` without `do_sample` (as every OpenAI config does) samples at that temperature.
    """

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="sampling temperature (OpenAI: 0 to 2); 0 means greedy")

    @model_validator(mode="before")
    @classmethod
    def _openai_habits(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or (info.context or {}).get("merging"):
            return data
        data = dict(data)
        temperature = data.get("temperature")
        if "do_sample" not in data and isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            data["do_sample"] = temperature > 0
        return data

    def check_caps(self, caps: GenerationCaps, field_prefix: str = "") -> None:
        """The shared checks, and a 400 for what the chat API cannot do (never dropped silently)."""
        super().check_caps(caps, field_prefix)
        prefix = f"{field_prefix}." if field_prefix else ""
        refusals = [
            (self.num_beams > 1, "num_beams", "the chat API has no beam search; use num_return_sequences (n) with sampling"),
            (bool(self.eos_token_id), "eos_token_id",
             "token ids belong to a local model's vocabulary; use stop to end the text at a string"),
            (self.max_length is not None, "max_length",
             "it counts the prompt's tokens, which only the upstream knows; use max_new_tokens (max_tokens)"),
        ]
        for refused, key, advice in refusals:
            if refused:
                raise RequestValidationError(f"{prefix}{key} is not supported by an OpenAI upstream: {advice}", f"{prefix}{key}")

    def to_openai_parameters(self) -> dict[str, Any]:
        """The chat completion parameters for this config (OpenAI's names; defaults left out).

        min_new_tokens, min_length, top_k, typical_p, repetition_penalty and no_repeat_ngram_size
        have no chat API parameter: accepted (configs written for local models work), not sent.
        """
        parameters: dict[str, Any] = {"max_tokens": self.max_new_tokens, "n": self.num_return_sequences}
        if self.is_greedy:
            parameters["temperature"] = 0.0
        else:
            parameters["temperature"] = self.temperature
            if self.top_p != 1.0:
                parameters["top_p"] = self.top_p
        if self.stop:
            parameters["stop"] = list(self.stop)
        if self.seed is not None:
            parameters["seed"] = self.seed
        if self.frequency_penalty:
            parameters["frequency_penalty"] = self.frequency_penalty
        if self.presence_penalty:
            parameters["presence_penalty"] = self.presence_penalty
        if self.response_format is not None:
            parameters["response_format"] = self.response_format.to_openai()
        return parameters


class OpenAIRespondRequest(RespondRequest):
    """`POST /respond` with configs in OpenAI's names too."""

    configs: list[OpenAIGenerationConfig | None] | None = None


class OpenAIGenerateGoalsRequest(GenerateGoalsRequest):
    """`POST /generate_goals` with configs in OpenAI's names too."""

    configs: list[OpenAIGenerationConfig | None] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatRenderRequest(BaseModel):
    """`POST /v1/render`: an OpenAI chat completion body; its parameters go over the default config."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    def config_override(self) -> dict[str, Any]:
        """The parameters it sets, in the generation config's keys (OpenAI's names are accepted there)."""
        override = self.model_dump(
            exclude_none=True, include={"temperature", "top_p", "n", "stop", "seed", "frequency_penalty", "presence_penalty"}
        )
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            override["max_tokens"] = max_tokens
        return override


@dataclass(frozen=True)
class RequestKeys:
    """Dream's per-request key fields, one value per dialog (None: the dialog brought none)."""

    api_keys: tuple[str | None, ...]
    organizations: tuple[str | None, ...]

    @property
    def present(self) -> bool:
        return any(self.api_keys) or any(self.organizations)

    def __repr__(self) -> str:
        return f"RequestKeys(api_keys={sum(1 for key in self.api_keys if key)} given)"


def parse_with_keys(
    model: type[OpenAIRespondRequest] | type[OpenAIGenerateGoalsRequest], data: Any, key_fields: tuple[str, ...]
) -> tuple[Any, RequestKeys]:
    """The request and its per-request keys; bad input raises RequestValidationError naming the field.

    `key_fields` are the sending variables a key may come in (Dream's `openai_api_keys`, and
    `<key env var>s` / `<KEY ENV VAR>_list` for this service's key variable).
    """
    request = parse_json(model, data)
    count = len(request.items())
    return request, RequestKeys(
        _per_item(_present(request.sending_variables, key_fields), count),
        _per_item(_present(request.sending_variables, ORGANIZATION_FIELDS), count),
    )


def _present(variables: SendingVariables, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    return [(name, variables.get(name)) for name in dict.fromkeys(names) if name in variables]


def _per_item(values: list[tuple[str, Any]], count: int) -> tuple[str | None, ...]:
    """One value per item from Dream's list fields: a list of one applies to every item."""
    merged: list[str | None] = [None] * count
    for name, value in values:
        if value is None:
            continue
        if not isinstance(value, list) or not all(item is None or isinstance(item, str) for item in value):
            raise RequestValidationError(f"{name} must be a list of strings (or nulls), one per dialog", name)
        if len(value) not in (1, count):
            raise RequestValidationError(f"{name} has {len(value)} items for {count} dialogs: give one, or one per dialog", name)
        for index in range(count):
            item = value[0] if len(value) == 1 else value[index]
            if item and merged[index] is None:
                merged[index] = item.strip() or None
    return tuple(merged)

