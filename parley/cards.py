"""Component cards: the schema of `components/<name>.yml`, loading them, and their errors.

A card is Dream's component card (name, group, connector, formatters, ...) plus the section its
kind needs: an LLM's `model` section (what a model registry keeps per model), a prompted skill's
`skill` section (its prompt file and LLM). Which kind a card is, and what it generates, is the
business of its kind (parley/kinds/): `card.kind`. Everything else in a distribution that mentions
a component (ports, overlays, generated configs, MODELS.md) is derived from its card.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.key_fields import KEY_FIELD_ENDINGS, is_key_field
from common.lm_protocol import GenerationConfig
from common.model_sources import GgufWeights
from common.validation import error_lines
from parley.yamlio import YamlSyntaxError, load_yaml_text

if TYPE_CHECKING:
    from parley.kinds import Kind

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_VAR_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
RAM_USAGE = re.compile(r"^\d+(\.\d+)?[KMGT]$")
# An OpenAI model name a card may give its weights (`model.names`): no spaces, no quotes.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
LLM_GROUP = "services"


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


class DerivedSection(_Strict):
    """What `parley add-llm` read from the model's own files (common.model_facts), kept so that
    `parley list`, MODELS.md and the memory estimate need not open the model. Not typed by hand:
    `parley check` compares it with the files, and `parley add-llm NAME` refreshes it."""

    format: Literal["gguf", "transformers"]
    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    file_size: int = Field(0, ge=0, description="bytes of the weights file(s)")
    context_window: int | None = Field(None, description="the longest sequence the model was trained for")
    chat_template: bool = False
    eos: list[str] = Field([], description="the model's end-of-generation tokens (tokenizer EOS, generation_config EOS, GGUF EOT/EOM)")
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    # Settings neither the registry (models/known.yml) nor the model's files gave: defaults to review.
    guessed: list[str] = []


class ModelSection(_Strict):
    """What a model registry keeps per model."""

    # Which LLM kind serves it (parley/kinds/llm.py): transformers (served here) or openai (forwarded).
    api: str = "transformers"
    source: str = Field(description="embedded name, local directory, .gguf file or Hugging Face id; for api=openai the upstream model name")
    sha256: str | None = None
    # The model's family in the registry (models/known.yml) when its file is known there.
    family: str | None = None
    # The LLM service's BACKEND (auto: llama_cpp for a .gguf, else transformers) and, on llama_cpp,
    # its GGUF_WEIGHTS (file: the GGUF's quantisation; q8_0, bf16, f16: a copy llama.cpp makes once;
    # auto: the service decides; common.model_sources.GgufWeights).
    backend: Literal["auto", "transformers", "llama_cpp"] = "auto"
    gguf_weights: GgufWeights = "auto"
    aliases: list[str] = []
    # More model names for the same weights, each with its own system prompt, prompt format,
    # generation defaults and stops (the service's MODEL_NAMES; services.transformers_lm.settings.ModelVariant).
    names: dict[str, dict[str, Any]] = {}
    # Tokens per sequence the service serves (CONTEXT_LENGTH), at most the model's window; with
    # batch_slots (MAX_BATCH_SIZE) it sizes the KV cache, and so the memory the service needs.
    context_length: int | None = Field(None, ge=64)
    batch_slots: int = Field(16, ge=1)
    half_precision: bool = False
    license: str | None = None
    # RayLLM's prompt_format fields (system, user, assistant, trailing_assistant, ...), as the LLM
    # service takes them in PROMPT_FORMAT; none: the tokenizer's chat template.
    prompt_format: dict[str, Any] | None = None
    # The stop set (STOP_SEQUENCES): the model's end-of-turn tokens and any text that ends an answer.
    stop: list[str] = []
    # The model's default generative config (common/generative_configs/<name>.json): only the keys an
    # LLM service accepts (common.lm_protocol.GenerationConfig), kept as written.
    generation_config: dict[str, Any] = {}
    key_env_vars: list[str] = []
    base_url: str | None = None
    derived: DerivedSection | None = None

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

    @field_validator("names")
    @classmethod
    def _valid_names(cls, names: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from services.transformers_lm.settings import ModelVariant

        for name, variant in names.items():
            if not MODEL_NAME.match(name):
                raise ValueError(f"{name!r} is not a model name: use letters, digits and . _ - : / (at most 128)")
            try:
                ModelVariant.model_validate(variant or {})
            except ValidationError as error:
                raise ValueError("; ".join(error_lines(error, root=f"({name})", prefix=name, model=ModelVariant))) from None
        return names

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

    @field_validator("api")
    @classmethod
    def _registered_api(cls, api: str) -> str:
        from parley.kinds import llm_apis

        if api not in llm_apis():
            raise ValueError(f"{api!r} is not an LLM api of parley: one of {', '.join(llm_apis())}")
        return api

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> "ModelSection":
        from parley.kinds import llm_kind

        problems = llm_kind(self.api).model_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SkillSection(_Strict):
    """What a prompted skill is: a prompt file (Dream's `{"prompt", "goals"}`) and the LLM it asks."""

    prompt_file: str = Field(description="its prompt, Dream's JSON {\"prompt\": ..., \"goals\": ...} under common/prompts/")
    llm: str = Field(description="the card name of the LLM it asks when a turn names none (GENERATIVE_SERVICE_URL)")
    goals: str | None = Field(None, description="what it is for, when the prompt file says none or says it badly (skill selection)")
    generative_config: str | None = Field(None, description="a file of generation keys it sends its LLM (GENERATIVE_SERVICE_CONFIG)")
    send_env: list[str] = Field([], description="env vars whose values it may send its LLM (Dream's ENVVARS_TO_SEND)")
    n_utterances_context: int = Field(7, ge=1, description="the most utterances of a dialog it sends its LLM")

    @field_validator("prompt_file", "generative_config")
    @classmethod
    def _json_file_in_the_repository(cls, value: str | None) -> str | None:
        if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts or not value.endswith(".json")):
            raise ValueError(f"{value!r} must be a .json file named relative to the repository root, e.g. common/prompts/fairytale.json")
        return value

    @field_validator("llm")
    @classmethod
    def _card_name(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not the name of a card (a lowercase DNS label)")
        return value

    @field_validator("send_env")
    @classmethod
    def _key_env_var_names(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = key_env_var_problem(name)
            if problem:
                raise ValueError(problem)
        return names


class AutoscalingSection(_Strict):
    """RayLLM's `autoscaling_config` (Ray Serve's meanings): the replicas follow the requests in progress.

    The autoscaler service of the stack (services/autoscaler) reads each replica's running and
    waiting requests and asks for ceil(total / target_ongoing_requests) replicas, within
    [min_replicas, max_replicas], once that wish has held for upscale_delay_s (more) or
    downscale_delay_s (fewer). The stack starts initial_replicas (default: min_replicas).
    """

    min_replicas: int = Field(1, ge=1, description="the fewest replicas (at least 1: a service with none cannot answer)")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at deploy; default: min_replicas")
    max_replicas: int = Field(1, ge=1, description="the most replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in progress (running + waiting) per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0, description="seconds more replicas must be wanted before they are added")
    downscale_delay_s: float = Field(600.0, ge=0, description="seconds fewer replicas must be wanted before some are removed")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "AutoscalingSection":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be at most max_replicas ({self.max_replicas})")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must be within min_replicas ({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self

    @property
    def starting_replicas(self) -> int:
        return self.initial_replicas or self.min_replicas


class DeploySection(_Strict):
    """How a swarm runs the component (`parley stack`): how many replicas and on which nodes."""

    replicas: int = Field(1, ge=1, description="replicas in a swarm; the agent runs them only with shared state (postgres.yml), else one")
    placement: list[str] = Field([], description="Swarm placement constraints, e.g. 'node.labels.zone == eu'")
    max_replicas_per_node: int | None = Field(None, ge=1, description="the most replicas Swarm places on one node")
    cpus: float | None = Field(None, gt=0, description="CPU cores per replica: its limit, and an LLM's model threads")
    autoscaling: AutoscalingSection | None = Field(None, description="replicas that follow the load (RayLLM's autoscaling_config)")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploySection":
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("give either replicas or autoscaling (whose replicas start at initial_replicas), not both")
        return self

    @property
    def starting_replicas(self) -> int:
        return self.autoscaling.starting_replicas if self.autoscaling else self.replicas


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
    skill: SkillSection | None = None
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
        if self.model is not None and self.name in (*self.model.names, *self.model.aliases):
            raise ValueError(f"model: the card's name {self.name!r} is already the model's name; drop it from names and aliases")
        return self

    @model_validator(mode="after")
    def _one_kind(self) -> "Card":
        from parley.kinds import kind_problems

        problems = kind_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def kind(self) -> "Kind":
        """The kind of component this card is (parley/kinds/): what it needs and what it generates."""
        from parley.kinds import kind_of

        return kind_of(self)

    @model_validator(mode="after")
    def _autoscaling_only_for_llms(self) -> "Card":
        if self.deploy is not None and self.deploy.autoscaling is not None and self.model is None:
            raise ValueError(
                "deploy.autoscaling: only an LLM service (a card with a model section) reports the requests it has in progress; "
                "give this component fixed deploy.replicas"
            )
        return self

    @property
    def port(self) -> int:
        return urlsplit(self.connector.url).port  # type: ignore[return-value]

    @property
    def pipeline_name(self) -> str:
        """Its name in a pipeline and as `active_skill` (Dream's: the service name with underscores)."""
        return self.name.replace("-", "_")

    @property
    def is_llm(self) -> bool:
        return self.kind.serves_llm

    @property
    def is_agent(self) -> bool:
        return self.kind.routes_turns

    @property
    def is_state_store(self) -> bool:
        return self.kind.stores_dialogs

    @property
    def calls_llms(self) -> bool:
        """A prompted skill: it may call any LLM of its distribution (LLM_ENDPOINTS)."""
        return self.kind.calls_llms

    @property
    def is_autoscaler(self) -> bool:
        """The stack's autoscaler (the autoscaler.yml overlay runs it)."""
        return self.kind.scales_services

    @property
    def is_monitoring(self) -> bool:
        """What watches a distribution's services (the monitoring.yml overlay runs it)."""
        return self.kind.watches_services

    @property
    def database(self) -> str:
        """A state store's database name (the path of its connector URL)."""
        return urlsplit(self.connector.url).path.strip("/")

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
    for section in ("model", "skill"):
        if getattr(card, section) is None:
            data.pop(section)
    if card.deploy is None:
        data.pop("deploy")
    else:  # as written: `replicas` beside `autoscaling` would be a conflict the card does not have
        data["deploy"] = card.deploy.model_dump(mode="json", exclude_unset=True)
    if card.model is not None:
        for name in card.kind.unused_model_fields:
            data["model"].pop(name)
    return data
