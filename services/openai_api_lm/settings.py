"""The OpenAI-API LLM service's settings: one typed object, read once from the environment.

Every setting is the environment variable of the same name in upper case (Dream's names where
Dream has one); this service's README lists them all, and a test checks it does. The API key is
not a setting of its own: it is read from the variable that `OPENAI_API_KEY_ENV_VAR` names (the
card's `--key-env`) and kept as a `SecretStr`, so no repr, log line or error message shows it.
"""

from __future__ import annotations

import re
from typing import Annotated, Mapping, Self

from pydantic import Field, SecretStr, field_validator

from common.lm_protocol import GenerationCaps
from common.settings_support import NOT_AN_ENV_VAR, RepoPath, ServiceSettings, SettingsError

_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


__all__ = ["Settings", "SettingsError"]


class Settings(ServiceSettings):
    """What the service reads from its environment. Field descriptions are the documentation."""

    # A value set in the wrong variable may be a key: errors never quote values.
    show_values_in_errors = False

    openai_base_url: str = Field(
        description="the upstream's OpenAI API root, e.g. https://api.openai.com/v1 (/chat/completions is appended)"
    )
    pretrained_model_name_or_path: str = Field(
        min_length=1, description="the upstream's model name, sent as `model`, e.g. gpt-4o-mini (Dream's variable)"
    )
    openai_api_key_env_var: str = Field(
        "OPENAI_API_KEY",
        description="the NAME of the variable that holds the API key (the card's --key-env); unset or empty key: no Authorization header",
    )
    api_key: Annotated[SecretStr | None, NOT_AN_ENV_VAR] = Field(
        None, exclude=True, description="read from the variable OPENAI_API_KEY_ENV_VAR names"
    )
    allow_request_api_keys: bool = Field(
        False,
        description="1: a request's own key (Dream's `openai_api_keys` field) replaces the service's; 0: such fields are ignored",
    )
    generative_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds a request may wait for the upstream in all; then 504"
    )
    generative_config: RepoPath | None = Field(
        None,
        description="the default generative config (JSON) that requests' configs are merged over; unset: greedy, 120 tokens, one hypothesis",
    )
    service_name: str = Field("openai-api-lm", description="the service's name, shown in /health and logs")
    service_port: int = Field(8181, ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0")
    max_new_tokens_cap: int = Field(4096, ge=1, description="the largest max_new_tokens / max_tokens a request may ask")
    max_num_return_sequences: int = Field(8, ge=1, description="the largest num_return_sequences / n a request may ask")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        return value

    @field_validator("openai_api_key_env_var")
    @classmethod
    def _is_a_variable_name(cls, value: str) -> str:
        if not _ENV_VAR_NAME.match(value):
            raise ValueError("must be the name of an environment variable, such as OPENAI_API_KEY (the name, not the key)")
        return value

    @property
    def chat_completions_url(self) -> str:
        return f"{self.openai_base_url}/chat/completions"

    @property
    def request_key_field(self) -> str:
        """Dream's request field for this service's key: the key variable's name, lower case, plus `s`."""
        return f"{self.openai_api_key_env_var.lower()}s"

    @property
    def caps(self) -> GenerationCaps:
        return GenerationCaps(
            max_new_tokens=self.max_new_tokens_cap, max_num_return_sequences=self.max_num_return_sequences
        )

    def _completed_from_env(self, environ: Mapping[str, str]) -> Self:
        """The API key, read from the variable OPENAI_API_KEY_ENV_VAR names."""
        key = environ.get(self.openai_api_key_env_var, "").strip()
        return self.model_copy(update={"api_key": SecretStr(key) if key else None})
