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

    def split_attributes(self) -> tuple[dict[str, Any], dict[str, str], list[str]]:
        """(attributes to store with the utterance, keys for this turn only by lower-case name, every
        secret value found). A key-shaped field (common/key_fields.py) is a key wherever it sits: at the
        top level (Dream's `openai_api_key`), in `api_keys`, or nested in any attribute (Dream's
        `lm_service_kwargs`, an `attributes` object), as a string, a list of them (Dream's sending
        variables, `openai_api_keys: [...]`) or an object of them. None of it is stored."""
        found = _Keys()
        for name, value in (self.api_keys or {}).items():
            found.add(name, value, explicit=True)
        extras = dict(self.model_extra or {})
        extras.update({"prompt": self.prompt, "lm_service_url": self.lm_service_url})
        attributes: dict[str, Any] = {}
        for name, value in extras.items():
            if value is None:
                continue
            # Credentials for a skill's LLM (OPENAI_API_KEY, openai_organization, ...): passed
            # to the skills for this turn only, never stored and never logged.
            if is_key_field(name):
                found.add(name, value, explicit=True)
                continue
            attributes[name] = found.strip(value)
        return attributes, found.keys, found.secrets


class _Keys:
    """The keys of one turn, collected while its attributes are copied without them."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.secrets: list[str] = []

    def add(self, name: str, value: Any, *, explicit: bool = False) -> None:
        """A key-shaped field's value: a string, a list of strings (Dream's plural sending variables)
        or an object of named keys. A top-level (explicit) key wins over one found nested."""
        if isinstance(value, str):
            if not value:
                return
            self.secrets.append(value)
            if explicit:
                self.keys[name.lower()] = value
            else:
                self.keys.setdefault(name.lower(), value)
        elif isinstance(value, list):
            singular = name[:-1] if name.lower().endswith("s") else name
            for item in value:
                self.add(singular, item)
        elif isinstance(value, dict):
            for inner, item in value.items():
                self.add(str(inner), item)

    def strip(self, value: Any) -> Any:
        """`value` without its key-shaped fields, at any depth (their values are collected)."""
        if isinstance(value, dict):
            kept = {}
            for name, item in value.items():
                if isinstance(name, str) and is_key_field(name):
                    self.add(name, item)
                else:
                    kept[name] = self.strip(item)
            return kept
        if isinstance(value, list):
            return [self.strip(item) for item in value]
        return value


class TurnResponse(BaseModel):
    """What `POST /` answers (Dream's http output formatter, plus confidence and debug_output)."""

    dialog_id: str
    utt_id: str
    user_id: str
    response: str
    active_skill: str
    confidence: float
    debug_output: list[dict[str, Any]] = Field(default_factory=list)
