"""The prompted skill's settings, read once from the environment (names as Dream uses them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from common.settings_support import NOT_AN_ENV_VAR, CommaList, EnvVars, Json, ServiceSettings, SettingsError, resolve_repo_path

DEFAULT_PROMPT = "Respond like a friendly chatbot."


__all__ = ["LLMEndpoint", "Settings", "SettingsError"]


class LLMEndpoint(BaseModel):
    """One allowed LLM `/respond` URL: the API-key env vars it may receive and the skill's generative
    config for it (a file of generation keys the skill sends; none: the LLM's own defaults apply)."""

    model_config = ConfigDict(extra="forbid")

    key_env_vars: list[str] = Field(default_factory=list)
    generative_config: str | None = None


class Settings(ServiceSettings):
    """Everything the skill reads from its environment, documented by field."""

    # The values of LLM_ENDPOINTS' key env vars are secrets: never quoted in an error.
    show_values_in_errors = False

    service_name: str = Field("prompted_skill", description="the name in logs and /health")
    service_port: int = Field(8147, ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0")
    prompt: Annotated[str, EnvVars(("PROMPT", "PROMPT_FILE"))] = Field(
        DEFAULT_PROMPT, min_length=1, description="the default prompt: PROMPT, else the contents of PROMPT_FILE"
    )
    generative_service_url: str | None = Field(None, description="the LLM `/respond` URL used when a turn names none")
    generative_service_config: str | None = Field(
        None, description="the generative config file the skill sends to GENERATIVE_SERVICE_URL"
    )
    generative_timeout: float = Field(20.0, gt=0, description="seconds to wait for the LLM")
    n_utterances_context: int = Field(7, ge=1, description="the most utterances of a dialog sent to the LLM")
    llm_endpoints: Annotated[
        dict[str, LLMEndpoint], Json('{"http://llm:8180/respond": {"key_env_vars": []}}')
    ] = Field(default_factory=dict, description="JSON object, allowed LLM URL -> {key_env_vars, generative_config}")
    envvars_to_send: CommaList = Field(
        (), description="Dream's ENVVARS_TO_SEND: the env vars whose values the skill itself may send (each only to an LLM "
        "whose LLM_ENDPOINTS entry lists it); unset: every key env var LLM_ENDPOINTS lists",
    )
    # The values of the key env vars that LLM_ENDPOINTS names, read once; never logged (SecretStr).
    env_keys: Annotated[dict[str, SecretStr], NOT_AN_ENV_VAR] = Field(
        default_factory=dict, description="values of the key_env_vars"
    )
    max_request_bytes: int = Field(1 << 20, ge=1024, description="the largest request body")

    @classmethod
    def _values_from_env(cls, environ: Mapping[str, str], values: dict[str, Any]) -> dict[str, Any]:
        endpoints = values.get("llm_endpoints")
        key_names = set()
        if isinstance(endpoints, dict):
            for entry in endpoints.values():
                names = entry.get("key_env_vars") if isinstance(entry, dict) else None
                key_names.update(name for name in names or () if isinstance(name, str))
        to_send = values.get("envvars_to_send")
        if to_send:  # only these of the skill's own variables may leave it
            key_names &= set(to_send)
        found: dict[str, Any] = {"env_keys": {name: environ[name] for name in sorted(key_names) if environ.get(name)}}
        prompt = _read_prompt(environ)
        if prompt is not None:
            found["prompt"] = prompt
        return found

    def allowed_urls(self) -> list[str]:
        """The LLM URLs this skill may contact: LLM_ENDPOINTS, plus GENERATIVE_SERVICE_URL."""
        urls = list(self.llm_endpoints)
        if self.generative_service_url and self.generative_service_url not in urls:
            urls.append(self.generative_service_url)
        return urls

    def generative_config_path(self, url: str) -> Path | None:
        """The skill's generative config file for `url` (an allowed URL), resolved against the repository
        root; None when the settings name none, so the LLM's own default config applies."""
        endpoint = self.llm_endpoints.get(url)
        if url == self.generative_service_url and self.generative_service_config:
            return resolve_repo_path(self.generative_service_config)
        if endpoint is not None and endpoint.generative_config:
            return resolve_repo_path(endpoint.generative_config)
        return None


def _read_prompt(environ: Mapping[str, str]) -> str | None:
    """PROMPT, else the prompt in PROMPT_FILE (text, or Dream's JSON `{"prompt": ...}`); None: neither is set."""
    if environ.get("PROMPT", "").strip():
        return environ["PROMPT"].strip()
    prompt_file = environ.get("PROMPT_FILE", "").strip()
    if not prompt_file:
        return None
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
