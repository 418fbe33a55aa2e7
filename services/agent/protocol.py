"""Wire models of the agent's HTTP API, compatible with Dream's agent."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from common.key_fields import is_key_field

COMMANDS = ("/start", "/close")


class TurnRequest(BaseModel):
    """`POST /`: a user's turn. Fields other than these become the utterance's attributes, as in Dream."""

    model_config = ConfigDict(extra="allow")

    user_id: StrictStr = Field(min_length=1, max_length=256)
    payload: StrictStr
    prompt: StrictStr | None = None
    lm_service_url: StrictStr | None = None
    api_keys: dict[str, StrictStr] | None = None

    def split_attributes(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(attributes to store with the utterance, keys for this turn only), keys by lower-case name."""
        attributes: dict[str, Any] = {}
        keys: dict[str, str] = {name.lower(): value for name, value in (self.api_keys or {}).items()}
        extras = dict(self.model_extra or {})
        extras.update({"prompt": self.prompt, "lm_service_url": self.lm_service_url})
        for name, value in extras.items():
            if value is None:
                continue
            # Credentials for a skill's LLM (OPENAI_API_KEY, openai_organization, ...): passed
            # to the skills for this turn only, never stored and never logged.
            if is_key_field(name):
                if isinstance(value, str) and value:
                    keys[name.lower()] = value
                continue
            attributes[name] = value
        return attributes, keys


class TurnResponse(BaseModel):
    """What `POST /` answers (Dream's http output formatter, plus confidence and debug_output)."""

    dialog_id: str
    utt_id: str
    user_id: str
    response: str
    active_skill: str
    confidence: float
    debug_output: list[dict[str, Any]] = Field(default_factory=list)
