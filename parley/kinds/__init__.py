"""Component kinds: what a card of each kind needs, and everything its component gets from it.

A kind is a class: its attributes say what the component can do (serves an LLM, calls LLMs, routes
turns, keeps dialogs, has a pipeline entry, ...), its methods make, from the card, the component's
environment, its compose service, its entries in each overlay of a distribution (dev.yml, cpu.yml,
proxy.yml, postgres.yml, autoscaler.yml, monitoring.yml), its healthcheck, its pipeline entry, its service_configs and its
endpoints. `parley generate`, `check`, `add-*` and `remove-*` ask a card's kind (`card.kind`);
nothing outside a kind's own class switches on what kind a card is.

Kinds register as the LLM service's backends do (services/transformers_lm/backends/__init__.py):
each module of KIND_MODULES has a `register_kinds(register)` hook; `registry()` calls them once.
A card is of the first registered kind whose `matches(card)` says so; the last one, `hand-written`,
takes any card no other kind claims (a service written by hand: checked, never generated).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

if TYPE_CHECKING:
    from parley.cards import Card

# Modules whose `register_kinds(register)` hook the registry calls, in this order (the order cards
# are matched in: the catch-all hand-written kind last).
KIND_MODULES = (
    "parley.kinds.llm",
    "parley.kinds.skill",
    "parley.kinds.agent",
    "parley.kinds.state",
    "parley.kinds.autoscaler",
    "parley.kinds.monitoring",
    "parley.kinds.hand_written",
)
# The overlays of a distribution, in the order `docker compose -f` takes them after the override.
DEV, CPU, PROXY, POSTGRES, AUTOSCALER, MONITORING = "dev.yml", "cpu.yml", "proxy.yml", "postgres.yml", "autoscaler.yml", "monitoring.yml"
BASE_IMAGE = "${BASE_IMAGE:-python:3.11-slim}"
PROXY_HOST = "${PARLEY_PROXY_HOST:-host.docker.internal}"
ENV_FILE = ".env"
REGENERATE = "parley generate"
YAML_HEADER = "# Generated from {card} by `" + REGENERATE + "`: edit the card, not this file."


class UnknownKindError(LookupError):
    """No registered kind has this name (or serves this LLM api); the message lists those that do."""


# --- what a kind is given: the distribution it is generated for ---------------------------------


@dataclass
class DistContext:
    """A distribution as its components' kinds see it: every card, and which of them it runs.

    `members` are the card-backed services of its override, in their order; the agents (in the base
    compose file) and the state store (its postgres.yml) belong to every distribution.
    """

    dist: str | None
    cards: dict[str, "Card"]
    members: list[str] = field(default_factory=list)
    # A repository file's text by its relative path (None: no such file): for what cards name.
    read: Callable[[str], str | None] = field(default=lambda relative: None, repr=False)
    # Components whose cards are going: whatever names them goes too.
    removed: frozenset[str] = frozenset()

    @property
    def llms(self) -> list["Card"]:
        return [self.cards[name] for name in self.members if self.cards[name].kind.serves_llm]

    @property
    def skills(self) -> list["Card"]:
        return [self.cards[name] for name in self.members if self.cards[name].kind.in_pipeline]

    @property
    def waited_for(self) -> list["Card"]:
        """What the agent waits for before it serves (its WAIT_HOSTS): every member it reaches."""
        return [self.cards[name] for name in self.members if self.cards[name].kind.waited_for]

    @property
    def agents(self) -> list["Card"]:
        return [card for card in self.cards.values() if card.kind.routes_turns]

    def _first(self, capability: str) -> "Card | None":
        """The first card, by name, whose kind has `capability` (what its overlay runs)."""
        found = sorted((card for card in self.cards.values() if getattr(card.kind, capability)), key=lambda card: card.name)
        return found[0] if found else None

    @property
    def store(self) -> "Card | None":
        """The state store the postgres.yml overlay runs."""
        return self._first("stores_dialogs")

    @property
    def autoscaler(self) -> "Card | None":
        """The autoscaler the autoscaler.yml overlay runs."""
        return self._first("scales_services")

    @property
    def monitor(self) -> "Card | None":
        """What the monitoring.yml overlay runs (Prometheus)."""
        return self._first("watches_services")

    def runs(self) -> list["Card"]:
        """What the distribution itself runs: its agents and members (the store only with postgres.yml)."""
        names = [card.name for card in self.agents] + list(self.members)
        return [self.cards[name] for name in dict.fromkeys(names)]

    def participants(self) -> list["Card"]:
        """Every card with a place in this distribution's files: agents, members, and what its
        overlays run (the store, the autoscaler, the monitor)."""
        names = [card.name for card in self.agents] + [name for name in self.members]
        names += [card.name for card in (self.store, self.autoscaler, self.monitor) if card is not None]
        return [self.cards[name] for name in dict.fromkeys(names)]

    @classmethod
    def standalone(cls, card: "Card", cards: dict[str, "Card"]) -> "DistContext":
        """The component with only what it needs (its LLM): what its service_configs describe."""
        members = [name for name in card.kind.requires(card) if name in cards] + [card.name]
        return cls(None, cards, members)

    @property
    def pipeline_config(self) -> str:
        return f"assistant_dists/{self.dist}/pipeline_conf.json"


# --- the kind -------------------------------------------------------------------------------


class Kind:
    """A kind of component. Capabilities are class attributes; subclasses override what they make."""

    name: ClassVar[str]
    description: ClassVar[str]
    # The card's `group` a new card of this kind gets (Dream's), and the section of the card it needs.
    group: ClassVar[str]
    section: ClassVar[str | None] = None
    # The service's folder in the repository (its Dockerfile, and its service_configs/ when it has them).
    package: ClassVar[str] = ""
    first_port: ClassVar[int] = 8100
    endpoints: ClassVar[tuple[str, ...]] = ()
    # Capabilities.
    serves_llm: ClassVar[bool] = False  # an LLM: in every prompted skill's LLM_ENDPOINTS and MODELS.md
    calls_llms: ClassVar[bool] = False  # asks the distribution's LLMs (LLM_ENDPOINTS, depends_on)
    routes_turns: ClassVar[bool] = False  # an agent: runs the pipeline, waits for WAIT_HOSTS
    stores_dialogs: ClassVar[bool] = False  # where agents keep dialogs (postgres.yml)
    scales_services: ClassVar[bool] = False  # a swarm stack's autoscaler (autoscaler.yml)
    watches_services: ClassVar[bool] = False  # scrapes every service's /metrics (monitoring.yml)
    in_pipeline: ClassVar[bool] = False  # has an entry in the distribution's pipeline_conf.json
    waited_for: ClassVar[bool] = True  # in the agent's WAIT_HOSTS when its distribution runs it
    generated: ClassVar[bool] = True  # its compose service and overlay entries come from its card
    has_service_configs: ClassVar[bool] = False  # Dream's <package>/service_configs/<name>/
    runs_model: ClassVar[bool] = False  # a swarm replica's cpus also set its model threads
    mounts_model_files: ClassVar[bool] = False  # the bind mounts it has are model files (travel in a bundle)
    reads_model_files: ClassVar[bool] = False  # add-llm and check read its model's files (template, stops, window, sha256)
    # The card field that names what it requires (for messages), e.g. a skill's `skill.llm`.
    requires_field: ClassVar[str] = ""
    # Fields of the LLM section this kind does not use (left out of the card file).
    unused_model_fields: ClassVar[tuple[str, ...]] = ()

    # -- which cards are of this kind, and what their cards need

    @classmethod
    def matches(cls, card: "Card") -> bool:
        """Whether `card` is of this kind (by default: it has this kind's section, or its group)."""
        if cls.section is not None:
            return getattr(card, cls.section, None) is not None
        return card.group == cls.group and card.model is None and card.skill is None

    def card_problems(self, card: "Card") -> list[str]:
        """What is wrong with the card alone, for this kind ("field: message" each)."""
        return []

    def bundle_problems(self, card: "Card", cards: dict[str, "Card"], read: Callable[[str], str | None]) -> list[str]:
        """What is wrong with the card among the others and the repository's files ("field: message")."""
        return []

    def requires(self, card: "Card") -> list[str]:
        """Cards a distribution must run too when it runs this one (a skill's LLM)."""
        return []

    # -- what it generates

    def environment(self, card: "Card", ctx: DistContext) -> dict[str, Any]:
        return {}

    def healthcheck(self, card: "Card") -> CommentedMap | None:
        return None

    def depends_on(self, card: "Card", ctx: DistContext) -> list[str]:
        """Services it must wait for, healthy, before it starts."""
        return []

    def compose_service(self, card: "Card", ctx: DistContext) -> CommentedMap | None:
        """Its whole service in the distribution's docker-compose.override.yml (None: it has none there)."""
        return None

    def update_override(self, entry: CommentedMap, card: "Card", ctx: DistContext) -> None:
        """Edit its hand-kept entry in the override in place (the agent's); the default keeps it."""

    def update_base(self, entry: CommentedMap, card: "Card") -> None:
        """Edit its entry in the base docker-compose.yml in place (the agent's); the default keeps it."""

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        """Its entry in one overlay of the distribution (None: it has none there)."""
        return None

    def overlay_volumes(self, card: "Card", overlay: str) -> list[str]:
        """Named volumes its overlay entry uses (declared at the overlay's top level)."""
        return []

    def pipeline_entry(self, card: "Card", ctx: DistContext) -> dict[str, Any] | None:
        """Its entry in the `services.<group>` of the distribution's pipeline_conf.json."""
        return None

    pipeline_group: ClassVar[str] = "skills"

    def service_config_dir(self, card_name: str) -> str:
        return f"{self.package}/service_configs/{card_name}"

    def service_config_files(self, card: "Card", cards: dict[str, "Card"]) -> dict[str, str]:
        """Dream's service_configs/<name>/{environment.yml,service.yml}: the component on its own."""
        if not self.has_service_configs:
            return {}
        from parley.yamlio import dump_yaml

        ctx = DistContext.standalone(card, cards)
        header = YAML_HEADER.format(card=f"components/{card.name}.yml")
        compose = self.compose_service(card, ctx) or CommentedMap()
        dev = self.overlay_service(card, DEV, ctx) or CommentedMap()
        for key, value in dev.items():
            compose[key] = value if key not in compose else CommentedSeq([*compose[key], *value])
        service = CommentedMap()
        service["name"] = card.name
        service["endpoints"] = CommentedSeq(list(self.endpoints))
        service["compose"] = compose
        proxy = self.overlay_service(card, PROXY, ctx)
        if proxy is not None:
            service["proxy"] = proxy
        environment = block(self.environment(card, ctx))
        folder = self.service_config_dir(card.name)
        return {
            f"{folder}/environment.yml": header + "\n" + dump_yaml(environment),
            f"{folder}/service.yml": header + "\n" + dump_yaml(service),
        }

    def card_files(self, card: "Card") -> dict[str, str]:
        """Other files generated from the card alone (an LLM's generative config)."""
        return {}

    def owned_files(self, card_name: str) -> list[str]:
        """Files that belong to a card of this kind named so, removed with it (besides service_configs)."""
        return []

    def named_files(self, card: "Card") -> list[str]:
        """Repository files the card names (a prompt file): kept while a card names them."""
        return []

    def remove_command(self, card_name: str) -> str:
        """How a maintainer takes a card of this kind out (for messages)."""
        return f"delete components/{card_name}.yml"

    def published_port(self, card: "Card") -> str:
        """The `ports:` entry of its dev.yml entry (on this machine only)."""
        return f"127.0.0.1:{card.port}:{card.port}"


# --- shapes every kind builds with -----------------------------------------------------------


def flow(items: Iterable[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def block(mapping: dict[str, Any]) -> CommentedMap:
    result = CommentedMap()
    for key, value in mapping.items():
        result[key] = block(value) if isinstance(value, dict) and not isinstance(value, CommentedMap) else value
    return result


def http_health_test(port: int, timeout_seconds: int) -> CommentedSeq:
    """A healthcheck's test: GET /health on the service's own port with python3's urllib."""
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout={timeout_seconds})"
    return flow(["CMD", "python3", "-c", probe])


def memory_limit(card: "Card") -> CommentedMap:
    return block({"resources": {"limits": {"memory": card.ram_usage}}})


def dev_entry(card: "Card", folders: Iterable[str]) -> CommentedMap:
    """dev.yml: the port on 127.0.0.1 and the source folders mounted read-only over the image's copy."""
    service = CommentedMap()
    service["ports"] = CommentedSeq([DoubleQuotedScalarString(card.kind.published_port(card))])
    service["volumes"] = CommentedSeq([f"./{folder}:/app/{folder}:ro" for folder in folders])
    return service


def healthy(names: Iterable[str]) -> CommentedMap:
    return block({name: {"condition": "service_healthy"} for name in names})


def plain(value: Any) -> Any:
    """A YAML node as plain JSON data (for comparing a generated value with what a file holds)."""
    return json.loads(json.dumps(value))


def set_if_changed(mapping: CommentedMap, key: str, value: Any) -> None:
    """`mapping[key] = value` unless it already holds that (so its style and comments stay); an
    existing key keeps its place."""
    if key not in mapping or plain(mapping[key]) != plain(value):
        mapping[key] = value


def ensure_map(parent: CommentedMap, key: str) -> CommentedMap:
    """The mapping under `key` (Dream's `- KEY=value` environment list converted), created when absent."""
    value = parent.get(key)
    if isinstance(value, list) and key == "environment":
        converted = CommentedMap()
        for item in value:
            name, _, text = str(item).partition("=")
            converted[name] = text
        parent[key] = converted
    elif not isinstance(value, dict):
        parent[key] = CommentedMap()
    return parent[key]


# --- the registry ----------------------------------------------------------------------------


class KindRegistry:
    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}

    def register(self, kind: type[Kind]) -> None:
        if kind.name in self.kinds:
            raise ValueError(f"kind {kind.name!r} is registered twice")
        self.kinds[kind.name] = kind()

    def kind_of(self, card: "Card") -> Kind:
        for kind in self.kinds.values():
            if kind.matches(card):
                return kind
        raise UnknownKindError(f"no kind of component matches the card {card.name!r}; kinds: {', '.join(self.kinds)}")

    def get(self, name: str) -> Kind:
        if name not in self.kinds:
            raise UnknownKindError(f"no kind {name!r}; kinds: {', '.join(self.kinds)}")
        return self.kinds[name]


@functools.cache
def registry() -> KindRegistry:
    """Every kind, registered by the `register_kinds` hook of each module of KIND_MODULES."""
    kinds = KindRegistry()
    for module_name in KIND_MODULES:
        importlib.import_module(module_name).register_kinds(kinds.register)
    return kinds


def kinds() -> list[Kind]:
    return list(registry().kinds.values())


def kind_of(card: "Card") -> Kind:
    return registry().kind_of(card)


def kind_problems(card: "Card") -> list[str]:
    """Why the card is not a valid card of its kind (none: it is)."""
    try:
        kind = kind_of(card)
    except UnknownKindError as error:
        return [str(error)]
    sections = [name for name in ("model", "skill") if getattr(card, name) is not None]
    if len(sections) > 1:
        return [f"a card has one kind: it has both {' and '.join(sections)} sections"]
    return kind.card_problems(card)


def llm_kinds() -> dict[str, Kind]:
    """The LLM kinds by the `api` of the card's model section they serve."""
    return {kind.api: kind for kind in kinds() if kind.serves_llm}  # type: ignore[attr-defined]


def llm_apis() -> list[str]:
    return list(llm_kinds())


def llm_kind(api: str) -> Any:
    found = llm_kinds().get(api)
    if found is None:
        raise UnknownKindError(f"no LLM kind serves api {api!r}; apis: {', '.join(llm_kinds())}")
    return found


def service_config_packages() -> list[str]:
    """The folders that hold generated service_configs/ (one per kind that has them)."""
    return list(dict.fromkeys(kind.package for kind in kinds() if kind.has_service_configs))


__all__ = [
    "AUTOSCALER", "CPU", "DEV", "MONITORING", "POSTGRES", "PROXY", "DistContext", "Kind", "UnknownKindError", "kind_of", "kinds",
    "llm_apis", "llm_kind", "llm_kinds", "registry",
]
