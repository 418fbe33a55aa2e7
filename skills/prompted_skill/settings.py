"""The prompted skill's settings, read once from the environment (names as Dream uses them)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from common.settings_support import SettingsError, env_values, resolve_repo_path, settings_error

DEFAULT_PROMPT = "Respond like a friendly chatbot."
DEFAULT_GENERATIVE_CONFIG = "common/generative_configs/default_generative_config.json"


__all__ = ["LLMEndpoint", "Settings", "SettingsError"]


class LLMEndpoint(BaseModel):
    """One allowed LLM `/respond` URL: the API-key env vars it may receive and its generative config."""

    model_config = ConfigDict(extra="forbid")

    key_env_vars: list[str] = Field(default_factory=list)
    generative_config: str | None = None


class Settings(BaseModel):
    """Everything the skill reads from its environment, documented by field."""

    model_config = ConfigDict(frozen=True)

    service_name: str = Field("prompted_skill", description="SERVICE_NAME: the name in logs and /health")
    service_port: int = Field(8147, description="SERVICE_PORT: the port gunicorn binds")
    prompt: str = Field(DEFAULT_PROMPT, description="PROMPT, or the contents of PROMPT_FILE: the default prompt")
    generative_service_url: str | None = Field(
        None, description="GENERATIVE_SERVICE_URL: the LLM `/respond` URL used when a turn names none"
    )
    generative_service_config: str | None = Field(
        None, description="GENERATIVE_SERVICE_CONFIG: the generative config file for GENERATIVE_SERVICE_URL"
    )
    generative_timeout: float = Field(20.0, gt=0, description="GENERATIVE_TIMEOUT: seconds to wait for the LLM")
    n_utterances_context: int = Field(7, ge=1, description="N_UTTERANCES_CONTEXT: utterances sent to the LLM")
    llm_endpoints: dict[str, LLMEndpoint] = Field(
        default_factory=dict,
        description="LLM_ENDPOINTS: JSON object, allowed LLM URL -> {key_env_vars, generative_config}",
    )
    # The values of the key env vars that LLM_ENDPOINTS names, read once; never logged (SecretStr).
    env_keys: dict[str, SecretStr] = Field(default_factory=dict, description="values of the key_env_vars")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="MAX_REQUEST_BYTES: the largest request body")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict = env_values(
            env,
            (
                "service_name", "service_port", "generative_service_url", "generative_service_config",
                "generative_timeout", "n_utterances_context", "max_request_bytes",
            ),
        )
        values["prompt"] = _read_prompt(env)
        endpoints = _parse_llm_endpoints(env.get("LLM_ENDPOINTS", ""))
        values["llm_endpoints"] = endpoints
        key_names = {name for endpoint in endpoints.values() for name in endpoint.key_env_vars}
        values["env_keys"] = {name: env[name] for name in sorted(key_names) if env.get(name)}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise settings_error(error) from None

    def allowed_urls(self) -> list[str]:
        """The LLM URLs this skill may contact: LLM_ENDPOINTS, plus GENERATIVE_SERVICE_URL."""
        urls = list(self.llm_endpoints)
        if self.generative_service_url and self.generative_service_url not in urls:
            urls.append(self.generative_service_url)
        return urls

    def generative_config_path(self, url: str) -> Path:
        """The generative config file for `url` (an allowed URL), resolved against the repository root."""
        endpoint = self.llm_endpoints.get(url)
        if url == self.generative_service_url and self.generative_service_config:
            name = self.generative_service_config
        elif endpoint is not None and endpoint.generative_config:
            name = endpoint.generative_config
        else:
            name = DEFAULT_GENERATIVE_CONFIG
        return resolve_repo_path(name)




def _read_prompt(env: Mapping[str, str]) -> str:
    if env.get("PROMPT", "").strip():
        return env["PROMPT"].strip()
    prompt_file = env.get("PROMPT_FILE", "").strip()
    if not prompt_file:
        return DEFAULT_PROMPT
    path = resolve_repo_path(prompt_file)
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(f"PROMPT_FILE {prompt_file!r} cannot be read: {error.strerror}") from None
    if path.suffix == ".json":
        # Dream's prompt files: {"prompt": "..."}.
        try:
            text = json.loads(text)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise SettingsError(f'PROMPT_FILE {prompt_file!r} must be JSON like {{"prompt": "..."}}') from None
    if not isinstance(text, str) or not text.strip():
        raise SettingsError(f"PROMPT_FILE {prompt_file!r} holds an empty prompt")
    return text.strip()


def _parse_llm_endpoints(raw: str) -> dict[str, LLMEndpoint]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SettingsError(f"LLM_ENDPOINTS is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError('LLM_ENDPOINTS must be a JSON object: {"http://llm:8180/respond": {"key_env_vars": []}}')
    try:
        return {url: LLMEndpoint.model_validate(entry) for url, entry in data.items()}
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        raise SettingsError(f"LLM_ENDPOINTS: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
