"""Wire models of this service beyond common/lm_protocol.py: OpenAI's config keys and Dream's key fields.

Dream's `/respond` and `/generate_goals` requests are parsed by the shared models; this module
adds what only an OpenAI upstream needs:

- `OpenAIGenerationConfig`: the shared generation config with OpenAI's own names and ranges
  (`max_tokens`, `n`, `stop` as a string, temperature up to 2), so Dream's OpenAI configs
  (e.g. `{"max_tokens": 256, "temperature": 0.4, ...}`) work unchanged; `to_openai_parameters()`
  turns it into the body of a chat completion request.
- Dream's per-request key fields (`openai_api_keys`, `openai_api_organizations`): taken out of
  the body before validation, one per dialog (or one for all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.lm_protocol import GenerateGoalsRequest, GenerationConfig, RespondRequest
from common.validation import RequestValidationError, parse_json

# OpenAI's name -> the shared config's name for the same thing.
OPENAI_KEY_NAMES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences"}
# Dream's field for per-request organizations (its skills send `<env var lower case>s`).
ORGANIZATION_FIELDS = ("openai_api_organizations", "openai_organizations")


class OpenAIGenerationConfig(GenerationConfig):
    """The shared generation config, with OpenAI's ranges and its extra keys and names.

    OpenAI has no `do_sample`: greedy decoding is sent as `temperature: 0`. A config that sets
    `temperature` without `do_sample` (as every OpenAI config does) samples at that temperature.
    """

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="sampling temperature (OpenAI: 0 to 2); 0 means greedy")

    @model_validator(mode="before")
    @classmethod
    def _accept_openai_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for openai_name, name in OPENAI_KEY_NAMES.items():
            if openai_name in data:
                if name in data:
                    raise RequestValidationError(f"give {name} or {openai_name}, not both", openai_name)
                data[name] = data.pop(openai_name)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        temperature = data.get("temperature")
        if "do_sample" not in data and isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            data["do_sample"] = temperature > 0
        if isinstance(temperature, int) and not isinstance(temperature, bool):
            data["temperature"] = float(temperature)  # JSON has one number type; strict mode would refuse 1
        return data

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return sorted({*cls.model_fields, *OPENAI_KEY_NAMES})

    def to_openai_parameters(self) -> dict[str, Any]:
        """The chat completion parameters for this config (OpenAI's names; defaults left out).

        min_new_tokens, top_k and repetition_penalty have no chat API parameter: accepted, not sent.
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

    `key_fields` are the names a key may come in (Dream's `openai_api_keys`, and `<key env var>s`
    for this service's key variable); they are removed before the request is validated, since
    the shared models forbid unknown fields.
    """
    if not isinstance(data, dict):
        raise RequestValidationError("the request body must be a JSON object")
    data = dict(data)
    key_values = [(name, data.pop(name)) for name in dict.fromkeys(key_fields) if name in data]
    organization_values = [(name, data.pop(name)) for name in ORGANIZATION_FIELDS if name in data]
    request = parse_json(model, data)
    count = len(request.items())
    api_keys = _per_item(key_values, count)
    organizations = _per_item(organization_values, count)
    return request, RequestKeys(api_keys, organizations)


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

