"""Adding and removing an LLM: a card from the command line's options, checked before anything is written."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.lm_protocol import DEFAULT_GENERATIVE_CONFIG
from common.model_sources import SourceKind
from parley.cards import DNS_LABEL, LLM_GROUP, Card, CardError, card_to_data, key_env_var_problem, parse_card
from parley.generate import Plan, plan_generation
from parley.kinds import UnknownKindError, llm_kind
from parley.repo import OVERRIDE, Repo
from parley.yamlio import YamlSyntaxError, dump_yaml, load_yaml_text

FIRST_LLM_PORT = 8180
DEFAULT_API = "transformers"
CARD_HEADER = "# The card of an LLM: the single source of its wiring. After editing it, run `parley generate`.\n"


class LlmError(ValueError):
    """Input refused before anything was written; the message says how to fix it."""


@dataclass
class LlmOptions:
    """What `parley add-llm` was given (None: keep the card's value or use the default)."""

    name: str
    model: str | None = None
    api: str | None = None  # None: the card's, else transformers
    base_url: str | None = None
    key_env: list[str] = field(default_factory=list)
    port: int | None = None
    dists: list[str] = field(default_factory=list)
    half_precision: bool | None = None
    context_length: int | None = None
    sha256: str | None = None
    ram_usage: str | None = None
    gpu_usage: str | None = None
    license: str | None = None
    description: str | None = None
    aliases: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    from_card: Path | None = None


def check_name(name: str) -> None:
    if not DNS_LABEL.match(name):
        raise LlmError(
            f"NAME {name!r} is not a lowercase DNS label: use a-z, 0-9 and '-' (at most 63, no leading or "
            "trailing '-'), e.g. transformers-lm-qwen2"
        )


def free_port(cards: dict[str, Card], name: str, start: int = FIRST_LLM_PORT) -> int:
    """The first port from `start` that no other card has."""
    taken = {card.port for card in cards.values() if card.name != name}
    port = start
    while port in taken:
        port += 1
    return port


def check_port(port: int, cards: dict[str, Card], name: str, error: type[Exception] | None = None) -> None:
    error = error or LlmError
    if not 1024 <= port <= 65535:
        raise error(f"--port {port} is outside 1024-65535: pick a free one, or leave --port out to get one")
    for card in cards.values():
        if card.port == port and card.name != name:
            raise error(f"--port {port} is taken by {card.name} (components/{card.name}.yml): pick another, or leave --port out")


def _weights_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.suffix in {".safetensors", ".bin", ".gguf", ".pt"})


def estimate_ram(source_kind: SourceKind | None, location: Path | None, half_precision: bool) -> str:
    """A memory limit for the container: weights as the service holds them plus 1 GiB of runtime."""
    if location is None:
        return "8G"  # a hub id: unknown until downloaded; the maintainer sets --ram-usage
    weights = _weights_bytes(location)
    # GGUF weights are dequantized to float32 (about 7x a 4-bit file); checkpoints load as stored.
    factor = 7 if source_kind is SourceKind.GGUF_FILE else 1
    if half_precision and source_kind is SourceKind.GGUF_FILE:
        factor = 3.5
    gib = round((weights * factor) / 2**30 + 1, 1)
    return f"{math.ceil(gib)}G"


def read_context_length(kind: SourceKind, location: Path) -> int | None:
    """The context length the model's own files declare, if any."""
    try:
        if kind is SourceKind.GGUF_FILE:
            import gguf

            reader = gguf.GGUFReader(str(location))
            architecture = reader.fields["general.architecture"].contents()
            field_ = reader.fields.get(f"{architecture}.context_length")
            return int(field_.contents()) if field_ is not None else None
        config = json.loads((location / "config.json").read_text())
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(config.get(key), int):
                return config[key]
    except Exception:  # a best-effort default; the maintainer can pass --context-length
        return None
    return None


def _default_generation_config(repo: Repo) -> dict[str, Any]:
    path = repo.path(DEFAULT_GENERATIVE_CONFIG)
    return json.loads(path.read_text()) if path.is_file() else {}


def build_card(repo: Repo, options: LlmOptions, cards: dict[str, Card]) -> Card:
    """The card `parley add-llm` writes: the existing card (or --from) updated with the given options."""
    check_name(options.name)
    existing = cards.get(options.name)
    if existing is not None and not existing.kind.serves_llm:
        raise LlmError(
            f"components/{options.name}.yml is not an LLM (no model section): choose another name for the LLM"
        )
    if options.from_card is not None:
        try:
            data = load_yaml_text(options.from_card.read_text(), str(options.from_card)) or {}
        except OSError as error:
            raise LlmError(f"--from {options.from_card}: {error.strerror}") from None
        data = json.loads(json.dumps(data))  # plain data, no ruamel types
        data["name"] = options.name
    elif options.name in cards:
        data = card_to_data(cards[options.name])
    else:
        data = {}
    model = dict(data.get("model") or {})
    api = options.api or model.get("api") or DEFAULT_API
    try:
        kind = llm_kind(api)
    except UnknownKindError as error:
        raise LlmError(f"--api: {error}") from None
    if options.model is not None:
        model["source"] = options.model
    if "source" not in model:
        raise LlmError("no model given: pass --model (an embedded name, a directory, a .gguf file or a Hugging Face id)")
    model["api"] = api
    if options.base_url is not None:
        model["base_url"] = options.base_url
    if options.key_env:
        model["key_env_vars"] = list(options.key_env)
    for name in model.get("key_env_vars", []):
        problem = key_env_var_problem(name)
        if problem:
            raise LlmError(f"--key-env {problem}")
    if options.half_precision is not None:
        model["half_precision"] = options.half_precision
    if options.context_length is not None:
        model["context_length"] = options.context_length
    if options.sha256 is not None:
        model["sha256"] = options.sha256.lower()
    if options.license is not None:
        model["license"] = options.license
    if options.aliases:
        model["aliases"] = list(options.aliases)
    if options.stop:
        model["stop"] = list(options.stop)

    try:
        facts = kind.prepare_model(repo, model)
    except ValueError as error:
        raise LlmError(str(error)) from None
    model.setdefault("generation_config", _default_generation_config(repo))

    if options.port is not None:
        port = options.port
    elif data.get("connector", {}).get("url"):
        port = urlsplit(data["connector"]["url"]).port or free_port(cards, options.name)
    else:
        port = free_port(cards, options.name)
    check_port(port, cards, options.name)

    data.update(
        {
            "name": options.name,
            "display_name": data.get("display_name") or options.name,
            "component_type": data.get("component_type", "Generative"),
            "model_type": data.get("model_type", kind.model_type),
            "is_customizable": data.get("is_customizable", False),
            "author": data.get("author") or "Parley maintainers",
            "description": options.description or data.get("description") or facts.description,
            "ram_usage": options.ram_usage or data.get("ram_usage") or facts.ram_usage,
            "gpu_usage": options.gpu_usage if options.gpu_usage is not None else data.get("gpu_usage"),
            "group": LLM_GROUP,
            "connector": {
                "protocol": "http",
                "timeout": float(data.get("connector", {}).get("timeout", 120.0)),
                "url": f"http://{options.name}:{port}/respond",
            },
            "dialog_formatter": data.get("dialog_formatter"),
            "response_formatter": data.get("response_formatter"),
            "previous_services": data.get("previous_services"),
            "required_previous_services": data.get("required_previous_services"),
            "state_manager_method": data.get("state_manager_method"),
            "tags": data.get("tags") or ["llm"],
            "endpoint": "respond",
            "service": kind.service_config_dir(options.name),
            "date_created": data.get("date_created") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "model": model,
        }
    )
    try:
        return parse_card(data, f"components/{options.name}.yml")
    except CardError as error:
        raise LlmError("the card would be invalid:\n" + "\n".join(error.problems)) from None


def card_text(card: Card, existing_text: str | None = None, display_path: str = "card", header: str = CARD_HEADER) -> str:
    """The card's file. An existing card is edited in place: when it already says the same, it is
    kept byte for byte; otherwise only what changed is rewritten, so its comments survive."""
    if existing_text is None:
        return header + dump_yaml(card_to_data(card))
    document = load_yaml_text(existing_text, display_path)
    try:
        if parse_card(document, display_path) == card:
            return existing_text
    except CardError:
        pass  # a card that does not parse is replaced by the valid one
    if not isinstance(document, dict):
        return header + dump_yaml(card_to_data(card))
    _update_in_place(document, card_to_data(card))
    return dump_yaml(document)


def _update_in_place(document: dict, data: dict) -> None:
    """Make `document` (a round-trip mapping) hold `data`, touching only keys whose value differs."""
    for key in [key for key in document if key not in data]:
        del document[key]
    for key, value in data.items():
        current = document.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            _update_in_place(current, value)
        elif key not in document:
            if value not in (None, [], {}):  # an unset optional field is not written into a hand-kept card
                document[key] = value
        elif current != value:
            document[key] = value


def distribution_members(repo: Repo, dist: str) -> set[str]:
    path = repo.dist_file(dist, OVERRIDE)
    document = load_yaml_text(repo.path(path).read_text(), path) or {}
    return set((document.get("services") or {}))


def plan_add_llm(repo: Repo, options: LlmOptions) -> tuple[Card, Plan]:
    """The card and every file it changes; raises LlmError/CardError/YamlSyntaxError before writing."""
    cards = repo.load_valid_cards()
    card = build_card(repo, options, cards)
    known = repo.distributions()
    dists = options.dists or [dist for dist in known if options.name in distribution_members(repo, dist)] or known
    for dist in dists:
        if dist not in known:
            raise LlmError(f"--dist {dist!r}: no assistant_dists/{dist}/{OVERRIDE}; known: {', '.join(known) or 'none'}")
    plan = plan_generation(repo, {**cards, card.name: card}, add_to={dist: [card.name] for dist in dists})
    card_path = f"components/{card.name}.yml"
    existing = repo.path(card_path)
    plan.files[card_path] = card_text(card, existing.read_text() if existing.is_file() else None, card_path)
    return card, plan


def default_llm_users(name: str, cards: dict[str, Card]) -> list[str]:
    """`components/<card>.yml: <field>` for each card that requires the LLM `name` (a skill's default LLM)."""
    return [
        f"components/{card.name}.yml: {card.kind.requires_field}"
        for card in cards.values()
        if card.name != name and name in card.kind.requires(card)
    ]


def plan_remove_llm(repo: Repo, name: str) -> Plan:
    cards = repo.load_valid_cards()
    card = cards.get(name)
    if card is None:
        llms = ", ".join(sorted(n for n, c in cards.items() if c.kind.serves_llm)) or "none"
        raise LlmError(f"no card components/{name}.yml: the LLMs are {llms}")
    if not card.kind.serves_llm:
        raise LlmError(f"components/{name}.yml is not an LLM (no model section): parley remove-llm removes only LLMs")
    users = default_llm_users(name, cards)
    if users:
        raise LlmError(
            f"{name} is the default LLM of a skill; point it at another LLM first (or remove the skill):\n" + "\n".join(users)
        )
    plan = plan_generation(repo, {n: c for n, c in cards.items() if n != name}, removed=[name])
    plan.files[f"components/{name}.yml"] = None
    return plan


__all__ = ["LlmError", "LlmOptions", "plan_add_llm", "plan_remove_llm", "YamlSyntaxError"]
