"""Component cards: the schema of `components/<name>.yml`, loading them, and their errors.

A card is Dream's component card (name, group, connector, formatters, ...) plus, for an LLM, a
`model` section with what a model registry keeps per model. Everything else in a distribution that
mentions a component (ports, overlays, generated configs, MODELS.md) is derived from its card.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.key_fields import KEY_FIELD_ENDINGS, is_key_field
from common.lm_protocol import GenerationConfig
from common.validation import error_lines
from parley.yamlio import YamlSyntaxError, load_yaml_text

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_VAR_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
RAM_USAGE = re.compile(r"^\d+(\.\d+)?[KMGT]$")
LLM_GROUP = "services"
AGENT_GROUP = "agent"
# A database the agents keep their dialogs in (the postgres card; the postgres.yml overlay).
STATE_GROUP = "state"
# What watches a distribution's services (the prometheus card; the monitoring.yml overlay).
MONITORING_GROUP = "monitoring"
# The package folder of each LLM backend (the `api` of a card's model section).
LLM_SERVICE_FOLDERS = {"transformers": "services/transformers_lm", "openai": "services/openai_api_lm"}


class CardError(ValueError):
    """A card that cannot be used; `problems` holds one "file: field: message" line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Connector(_Strict):
    # http: a service of the pipeline; postgresql: a database (url postgresql://<service>:<port>/<db>).
    protocol: Literal["http", "postgresql"] = "http"
    timeout: float = Field(gt=0)
    url: str

    @model_validator(mode="after")
    def _url_with_port(self) -> "Connector":
        parts = urlsplit(self.url)
        if parts.scheme != self.protocol or not parts.hostname or parts.port is None:
            shape = "http://<service>:<port>/<endpoint>" if self.protocol == "http" else "postgresql://<service>:<port>/<database>"
            raise ValueError(f"url: must be {shape}")
        if not 1024 <= parts.port <= 65535:
            raise ValueError(f"url: port {parts.port} is outside 1024-65535")
        return self


class ModelSection(_Strict):
    """What a model registry keeps per model."""

    api: Literal["transformers", "openai"] = "transformers"
    source: str = Field(description="embedded name, local directory, .gguf file or Hugging Face id; for api=openai the upstream model name")
    sha256: str | None = None
    aliases: list[str] = []
    context_length: int | None = Field(None, ge=1)
    half_precision: bool = False
    license: str | None = None
    # RayLLM's prompt_format fields (system, user, assistant, trailing_assistant, ...), as the LLM
    # service takes them in PROMPT_FORMAT; none: the tokenizer's chat template.
    prompt_format: dict[str, Any] | None = None
    stop: list[str] = []
    # The model's default generative config (common/generative_configs/<name>.json): only the keys an
    # LLM service accepts (common.lm_protocol.GenerationConfig), kept as written.
    generation_config: dict[str, Any] = {}
    key_env_vars: list[str] = []
    base_url: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("prompt_format")
    @classmethod
    def _valid_prompt_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from services.transformers_lm.settings import PromptFormat

            try:
                PromptFormat.model_validate(value)
            except ValidationError as error:
                raise ValueError("; ".join(error_lines(error, root="(prompt_format)", model=PromptFormat))) from None
        return value

    @field_validator("key_env_vars")
    @classmethod
    def _key_env_var_names(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = key_env_var_problem(name)
            if problem:
                raise ValueError(problem)
        return names

    @field_validator("generation_config")
    @classmethod
    def _valid_generation_keys(cls, config: dict[str, Any]) -> dict[str, Any]:
        try:
            GenerationConfig.model_validate(config)
        except ValidationError as error:
            raise ValueError("; ".join(generation_config_problems(error))) from None
        return config

    @model_validator(mode="after")
    def _api_fields(self) -> "ModelSection":
        if self.api == "openai" and not self.base_url:
            raise ValueError("an api=openai model needs base_url (the upstream's /v1 URL)")
        if self.api == "transformers" and self.base_url:
            raise ValueError("base_url is only for api=openai models")
        return self


class DeploySection(_Strict):
    """How a swarm runs the component (`parley stack`): how many replicas and on which nodes."""

    replicas: int = Field(1, ge=1, description="replicas in a swarm; the agent runs them only with shared state (postgres.yml), else one")
    placement: list[str] = Field([], description="Swarm placement constraints, e.g. 'node.labels.zone == eu'")
    cpus: float | None = Field(None, gt=0, description="CPU cores per replica: its limit, and an LLM's model threads")


class Card(_Strict):
    """A component card (Dream's fields) with an optional `model` section for LLMs."""

    name: str
    display_name: str
    component_type: str | None = None
    model_type: str | None = None
    is_customizable: bool = False
    author: str
    description: str
    ram_usage: str
    gpu_usage: str | None = None
    group: str
    connector: Connector
    dialog_formatter: str | dict[str, Any] | None = None
    response_formatter: str | None = None
    previous_services: list[str] | None = None
    required_previous_services: list[str] | None = None
    state_manager_method: str | None = None
    tags: list[str] | None = None
    endpoint: str
    service: str
    date_created: str
    model: ModelSection | None = None
    deploy: DeploySection | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if not DNS_LABEL.match(name):
            raise ValueError(f"{name!r} is not a lowercase DNS label (a-z, 0-9 and '-', at most 63)")
        return name

    @field_validator("ram_usage", "gpu_usage")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None and not RAM_USAGE.match(value):
            raise ValueError(f"{value!r} is not a size such as 512M or 1.5G")
        return value

    @model_validator(mode="after")
    def _url_names_the_service(self) -> "Card":
        if urlsplit(self.connector.url).hostname != self.name:
            raise ValueError(f"connector.url must name the service {self.name!r} as its host")
        return self

    @property
    def port(self) -> int:
        return urlsplit(self.connector.url).port  # type: ignore[return-value]

    @property
    def is_llm(self) -> bool:
        return self.model is not None

    @property
    def is_agent(self) -> bool:
        return self.group == AGENT_GROUP

    @property
    def is_state_store(self) -> bool:
        return self.group == STATE_GROUP

    @property
    def is_monitoring(self) -> bool:
        return self.group == MONITORING_GROUP

    @property
    def database(self) -> str:
        """A state store's database name (the path of its connector URL)."""
        return urlsplit(self.connector.url).path.strip("/")

    @property
    def calls_llms(self) -> bool:
        """A prompted skill: it may call any LLM of its distribution (LLM_ENDPOINTS)."""
        return self.service.startswith("skills/prompted_skill/") or self.service == "skills/prompted_skill"

    @property
    def respond_url(self) -> str:
        return f"http://{self.name}:{self.port}/respond"


def key_env_var_problem(name: str) -> str | None:
    """Why `name` cannot hold an LLM's API key (None: it can): it must be an env var name that the
    agent recognises as a key field (common.key_fields), or a key sent under it would be stored."""
    if not ENV_VAR_NAME.match(name):
        return f"{name!r} is not an env var name: use A-Z, 0-9 and _, e.g. OPENAI_API_KEY"
    if not is_key_field(name):
        return (
            f"{name!r} must end in {KEY_FIELD_ENDINGS} (e.g. {name}_KEY): the agent keeps a turn's fields with "
            "such names out of the dialog state, and would store a key sent under any other name"
        )
    return None


def generation_config_problems(error: ValidationError) -> list[str]:
    """"key: message" per problem of a generative config (unknown keys list the keys an LLM service accepts)."""
    return error_lines(error, root="(config)", model=GenerationConfig)


def parse_card(data: Any, display_path: str) -> Card:
    if not isinstance(data, dict):
        raise CardError([f"{display_path}: (card): must be a YAML mapping"])
    try:
        return Card.model_validate(data)
    except ValidationError as error:
        raise CardError([f"{display_path}: {line}" for line in error_lines(error, root="(card)", model=Card)]) from None


def load_card(path: Path, display_path: str | None = None) -> Card:
    shown = display_path or str(path)
    try:
        data = load_yaml_text(path.read_text(), shown)
    except YamlSyntaxError as error:
        raise CardError([str(error)]) from None
    card = parse_card(data, shown)
    if card.name != path.stem:
        raise CardError([f"{shown}: name: {card.name!r} differs from the file name {path.stem!r}"])
    return card


def card_to_data(card: Card) -> dict[str, Any]:
    """The card as plain data in the schema's field order, without unset model defaults noise."""
    data = card.model_dump(mode="json")
    if card.deploy is None:
        data.pop("deploy")
    if card.model is not None:
        if card.model.api == "transformers":
            data["model"].pop("base_url")
    return data
