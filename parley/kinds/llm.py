"""LLM kinds: a model served here (services/transformers_lm) or an OpenAI-compatible upstream
forwarded to (services/openai_api_lm). The card's `model.api` names the kind.

An LLM card generates, in every distribution that runs it: its service in the override (build args,
`env_file: [.env, .env_secret]`, its environment, a local model bind-mounted read-only at /models/<name>, a
healthcheck, the memory limit), its dev.yml, cpu.yml and proxy.yml entries (the upstream kind runs
no model: neither cpu.yml nor proxy.yml), its host:port in the agent's WAIT_HOSTS and its entry in
every prompted skill's LLM_ENDPOINTS; and once: its service_configs and its generative config
(common/generative_configs/<name>.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from common.model_sources import EMBEDDED_MODELS
from parley.api_keys import secret_env_file
from parley.kinds import BASE_IMAGE, CPU, DEV, ENV_FILE, PROXY, PROXY_HOST, DistContext, Kind, block, dev_entry, flow, http_health_test, memory_limit

if TYPE_CHECKING:
    from parley.cards import Card, ModelSection
    from parley.repo import Repo

FIRST_LLM_PORT = 8180
# The fields of a model section that only a model served here (api=transformers) has.
LOCAL_MODEL_FIELDS = ("family", "backend", "gguf_weights", "names", "batch_slots", "derived")


@dataclass(frozen=True)
class ModelFacts:
    """What `parley add-llm` derives from a model section for a new card's defaults."""

    description: str
    ram_usage: str


def generative_config_path(card_name: str) -> str:
    return f"common/generative_configs/{card_name}.json"


class LlmKind(Kind):
    """What both LLM kinds share: their card has a `model` section whose `api` names the kind."""

    api: ClassVar[str]
    group = "services"
    section = "model"
    first_port = FIRST_LLM_PORT
    serves_llm = True
    has_service_configs = True
    endpoints = ("respond", "generate_goals", "v1/models", "v1/chat/completions", "v1/completions")
    # What `parley add-llm` writes into a new card of this kind, and whether it reads the model's
    # files first (a model served here: its template, stops, window, sha256 and memory need).
    model_type: ClassVar[str] = "NN-based"
    default_ram_usage: ClassVar[str | None] = None

    @classmethod
    def matches(cls, card: "Card") -> bool:
        return card.model is not None and card.model.api == cls.api

    def model_problems(self, model: "ModelSection") -> list[str]:
        """What is wrong with the model section for this kind."""
        clashes = sorted(set(model.names) & set(model.aliases))
        if clashes:
            return [f"names and aliases share {', '.join(clashes)}: a model name means one set of settings"]
        return []

    def prepare_model(self, repo: "Repo", model: dict[str, Any]) -> ModelFacts:
        """Complete a model section `parley add-llm` is writing (in place) and derive the card's
        defaults; ValueError, with the fix in its message, for a model that cannot be used."""
        raise NotImplementedError

    def remove_command(self, card_name: str) -> str:
        return f"`parley remove-llm {card_name}`"

    def environment(self, card: "Card", ctx: DistContext | None = None) -> dict[str, Any]:
        environment: dict[str, Any] = {"SERVICE_NAME": card.name, "SERVICE_PORT": card.port}
        environment.update(self.model_environment(card))
        environment["GENERATIVE_CONFIG"] = generative_config_path(card.name)
        return environment

    def model_environment(self, card: "Card") -> dict[str, Any]:
        return {}

    def build_args(self, card: "Card") -> dict[str, Any]:
        return {"BASE_IMAGE": BASE_IMAGE, "SERVICE_PORT": card.port, "SERVICE_NAME": card.name}

    def volumes(self, card: "Card") -> list[str]:
        return []

    def healthcheck(self, card: "Card") -> CommentedMap:
        check = block({"test": None, "interval": "10s", "timeout": "10s", "retries": 3, "start_period": "300s"})
        check["test"] = http_health_test(card.port, 5)
        return check

    def compose_service(self, card: "Card", ctx: DistContext) -> CommentedMap:
        service = block({"build": {"context": ".", "dockerfile": f"{self.package}/Dockerfile", "args": self.build_args(card)}})
        service["env_file"] = flow([ENV_FILE, secret_env_file()])
        service["environment"] = block(self.environment(card))
        volumes = self.volumes(card)
        if volumes:
            service["volumes"] = CommentedSeq(volumes)
        service["init"] = True
        service["healthcheck"] = self.healthcheck(card)
        service["deploy"] = memory_limit(card)
        return service

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        if overlay == DEV:
            return dev_entry(card, [self.package, "common"])
        return None

    def card_files(self, card: "Card") -> dict[str, str]:
        assert card.model is not None
        return {generative_config_path(card.name): json.dumps(card.model.generation_config, indent=4) + "\n"}

    def owned_files(self, card_name: str) -> list[str]:
        return [generative_config_path(card_name)]


class LocalLlm(LlmKind):
    """A model this distribution serves itself, on the CPU or a GPU (services/transformers_lm)."""

    name = "local-llm"
    api = "transformers"
    description = "an LLM served here by services/transformers_lm (an embedded model, a directory, a .gguf file or a Hugging Face id)"
    package = "services/transformers_lm"
    runs_model = True
    mounts_model_files = True
    reads_model_files = True
    unused_model_fields = ("base_url",)

    def model_problems(self, model: "ModelSection") -> list[str]:
        if model.base_url:
            return ["base_url is only for api=openai models"]
        return super().model_problems(model)

    def prepare_model(self, repo: "Repo", model: dict[str, Any]) -> ModelFacts:
        """The defaults of a card whose model add-llm has already read (parley/llms.py: its file, the
        registry); the memory limit is then fitted to the model's estimate, 8G when nothing could be
        read (a hub id not on this machine: the maintainer sets --ram-usage)."""
        source = str(model["source"])
        embedded = EMBEDDED_MODELS.get(source)
        description = embedded.description if embedded is not None else f"{source} served by {self.package}"
        return ModelFacts(description, "8G")

    def container_model_path(self, card: "Card") -> str | None:
        """Where a local model source is mounted in the container (None for embedded names and hub ids)."""
        assert card.model is not None
        source = card.model.source
        if source in EMBEDDED_MODELS:
            return None
        if source.lower().endswith(".gguf"):
            return f"/models/{card.name}/{Path(source).name}"
        if source.startswith((".", "/", "~")) or Path(source).exists():
            return f"/models/{card.name}"
        return None

    def volumes(self, card: "Card") -> list[str]:
        target = self.container_model_path(card)
        if target is None:
            return []
        assert card.model is not None
        return [f"{card.model.source}:{target}:ro"]

    def model_environment(self, card: "Card") -> dict[str, Any]:
        model = card.model
        assert model is not None
        environment: dict[str, Any] = {
            "PRETRAINED_MODEL_NAME_OR_PATH": self.container_model_path(card) or model.source,
            "HALF_PRECISION": "true" if model.half_precision else "false",
        }
        if model.backend != "auto":
            environment["BACKEND"] = model.backend
        if model.gguf_weights != "auto":
            environment["GGUF_WEIGHTS"] = model.gguf_weights
        if model.sha256:
            environment["MODEL_SHA256"] = model.sha256
        # The service answers to the card's name (never a container path), its names and aliases.
        environment["SERVED_MODEL_NAME"] = card.name
        if model.aliases:
            environment["MODEL_ALIASES"] = ",".join(model.aliases)
        if model.names:
            environment["MODEL_NAMES"] = json.dumps(model.names)
        if model.context_length is not None:
            environment["CONTEXT_LENGTH"] = model.context_length
        environment["MAX_BATCH_SIZE"] = model.batch_slots
        if model.stop:
            environment["STOP_SEQUENCES"] = json.dumps(model.stop)
        if model.prompt_format:
            environment["PROMPT_FORMAT"] = json.dumps(model.prompt_format)
        return environment

    def build_args(self, card: "Card") -> dict[str, Any]:
        environment = self.model_environment(card)
        # What the image's build step converts the model for (it loads it once, as the service will).
        converted = ("PRETRAINED_MODEL_NAME_OR_PATH", "HALF_PRECISION", "BACKEND", "GGUF_WEIGHTS")
        return {**super().build_args(card), **{key: environment[key] for key in converted if key in environment}}

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        if overlay == CPU:
            return block({"environment": {"DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": DoubleQuotedScalarString("")}})
        if overlay == PROXY:
            service = block(
                {
                    "build": {"context": ".", "dockerfile": "services/proxy/Dockerfile"},
                    "environment": {"PROXY_PASS": f"{PROXY_HOST}:{card.port}", "PORT": card.port},
                }
            )
            # The default upstream is this port on the Docker host (e.g. the model run by `parley up`).
            service["extra_hosts"] = CommentedSeq(["host.docker.internal:host-gateway"])
            return service
        return super().overlay_service(card, overlay, ctx)


class UpstreamLlm(LlmKind):
    """An LLM behind an OpenAI-compatible API elsewhere, forwarded to by services/openai_api_lm.

    It runs no model here: it has no cpu.yml entry, and no proxy.yml entry (it is already a thin client).
    """

    name = "upstream-llm"
    api = "openai"
    description = "an LLM behind an OpenAI-compatible API, forwarded to by services/openai_api_lm"
    package = "services/openai_api_lm"
    model_type = "External"
    default_ram_usage = "512M"
    unused_model_fields = LOCAL_MODEL_FIELDS

    def model_problems(self, model: "ModelSection") -> list[str]:
        if not model.base_url:
            return ["an api=openai model needs base_url (the upstream's /v1 URL)"]
        if model.names:
            return ["names are only for api=transformers models (they are served by services/transformers_lm)"]
        return super().model_problems(model)

    def prepare_model(self, repo: "Repo", model: dict[str, Any]) -> ModelFacts:
        if not model.get("base_url"):
            raise ValueError("--api openai needs --base-url, the upstream's OpenAI API root (e.g. https://api.openai.com/v1)")
        parts = urlsplit(str(model["base_url"]))
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"--base-url {model['base_url']!r} is not an http(s) URL such as https://api.openai.com/v1")
        return ModelFacts(f"{model['source']} at {model['base_url']} through {self.package}", "512M")

    def model_environment(self, card: "Card") -> dict[str, Any]:
        model = card.model
        assert model is not None
        environment: dict[str, Any] = {"PRETRAINED_MODEL_NAME_OR_PATH": model.source, "OPENAI_BASE_URL": model.base_url}
        if model.key_env_vars:
            environment["OPENAI_API_KEY_ENV_VAR"] = model.key_env_vars[0]
        return environment


def register_kinds(register) -> None:
    register(LocalLlm)
    register(UpstreamLlm)
