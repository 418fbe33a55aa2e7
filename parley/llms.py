"""Adding and removing an LLM: a card from the command line's options, checked before anything is written."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.lm_protocol import DEFAULT_GENERATIVE_CONFIG
from common.model_facts import ModelFactsError
from common.model_sources import EMBEDDED_MODELS, ModelSourceError
from parley.cards import DNS_LABEL, LLM_GROUP, Card, CardError, card_to_data, key_env_var_problem, parse_card
from parley.generate import Plan, plan_generation
from parley.kinds import UnknownKindError, llm_kind
from parley.known_models import KNOWN_MODELS_FILE, KnownModel, KnownModels, KnownModelsError, load_known_models
from parley.memory import parse_size, ram_usage_text
from parley.model_files import ModelFile, ModelFileCache, hub_cache_folder
from parley.model_fit import Located, card_model_problems, derived_from, locate_model, memory_estimate
from parley.repo import OVERRIDE, Repo
from parley.yamlio import YamlSyntaxError, dump_yaml, load_yaml_text

FIRST_LLM_PORT = 8180
DEFAULT_API = "transformers"
# What a card serves per sequence when neither the registry nor the command says: the model's window,
# at most this (a long window times the batch slots would be a KV cache of many GiB).
DEFAULT_CONTEXT_CAP = 4096
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


def _default_generation_config(repo: Repo) -> dict[str, Any]:
    path = repo.path(DEFAULT_GENERATIVE_CONFIG)
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class BuiltCard:
    """A card `add-llm` would write, and what it says about how the card came about."""

    card: Card
    notes: list[str] = field(default_factory=list)


@dataclass
class _ModelReading:
    """What add-llm learnt of a local model: its file's sha256 and facts, and the registry's entry."""

    model_file: ModelFile | None
    known: KnownModel | None = None


def _read_model(repo: Repo, source: str, cache: ModelFileCache, known: KnownModels) -> tuple[Located, _ModelReading]:
    try:
        located = locate_model(repo.root, source)
    except ModelSourceError as error:
        raise LlmError(f"--model: {error}") from None
    folder = located.location if located.location is not None else hub_cache_folder(located.requested)
    if folder is None:
        return located, _ModelReading(None)
    try:
        model_file = cache.inspect(folder)
    except ModelFactsError as error:
        raise LlmError(f"--model: {error}") from None
    return located, _ModelReading(model_file, known.get(model_file.sha256))


def build_card(
    repo: Repo,
    options: LlmOptions,
    cards: dict[str, Card],
    *,
    known: KnownModels | None = None,
    cache: ModelFileCache | None = None,
) -> BuiltCard:
    """The card `parley add-llm` writes: the existing card (or --from) updated with the given options,
    and for a model served here what its file says and what the registry knows of its sha256."""
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
        if model.get("source") not in (None, options.model):
            model.pop("derived", None)  # another model: nothing read from the old one holds
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
    if options.license is not None:
        model["license"] = options.license
    if options.aliases:
        model["aliases"] = list(options.aliases)
    if options.stop:
        model["stop"] = list(options.stop)

    notes: list[str] = []
    reading = _ModelReading(None)
    if kind.reads_model_files:
        located, reading = _read_model(repo, str(model["source"]), cache or ModelFileCache(), known or KnownModels({}))
        if located.location is not None and located.requested not in EMBEDDED_MODELS:
            # compose mounts it, so it must not depend on the cwd: relative to the repository
            # root (compose's project directory) when inside it, else absolute
            location = located.location.resolve()
            inside = location.is_relative_to(repo.root.resolve())
            model["source"] = f"./{location.relative_to(repo.root.resolve()).as_posix()}" if inside else str(location)
        notes += _apply_model_reading(options, model, reading, located)
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

    default_description = facts.description
    if reading.known is not None and reading.known.description:
        default_description = reading.known.description
    ram_given = options.ram_usage or data.get("ram_usage")
    display_name = data.get("display_name") or (reading.known.display_name if reading.known is not None else None) or options.name
    data.update(
        {
            "name": options.name,
            "display_name": display_name,
            "component_type": data.get("component_type", "Generative"),
            "model_type": data.get("model_type", kind.model_type),
            "is_customizable": data.get("is_customizable", False),
            "author": data.get("author") or "Parley maintainers",
            "description": options.description or data.get("description") or default_description,
            "ram_usage": ram_given or facts.ram_usage,
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
        card = parse_card(data, f"components/{options.name}.yml")
    except CardError as error:
        raise LlmError("the card would be invalid:\n" + "\n".join(error.problems)) from None
    if reading.model_file is not None:
        card, memory_notes = _fit_memory(card, reading.model_file, options.ram_usage, kept=bool(ram_given))
        notes += memory_notes
        problems = card_model_problems(card, reading.model_file.facts)
        if problems:
            raise LlmError("the card would not fit its model:\n" + "\n".join(f"components/{card.name}.yml: {p}" for p in problems))
    return BuiltCard(card, notes)


def _apply_model_reading(options: LlmOptions, model: dict[str, Any], reading: _ModelReading, located: Located) -> list[str]:
    """Fill the model section from the file (derived values) and the registry; the notes to print."""
    model_file, known = reading.model_file, reading.known
    if model_file is None:
        if model.get("sha256") or options.sha256:
            raise LlmError("--sha256 checks a model file here (a .gguf, or a folder with one .safetensors); this hub id is not in the local cache")
        return [f"{located.requested} is not on this machine (nor in the Hugging Face cache): nothing could be read from it; "
                "set --context-length, --stop and --ram-usage yourself"]
    facts = model_file.facts
    where = model_file.path.name if located.requested not in EMBEDDED_MODELS else located.requested
    if options.sha256 is not None and options.sha256.lower() != model_file.sha256:
        raise LlmError(f"--sha256 does not match {model_file.path}: the file's sha256 is {model_file.sha256}")
    if model_file.sha256 is not None:
        model["sha256"] = model_file.sha256
    elif model.get("sha256"):
        raise LlmError(f"--sha256 pins one model file, but {model_file.path} holds several weights files; drop it")

    guessed: list[tuple[str, str]] = []  # (setting, what was assumed)
    notes: list[str] = []
    window = facts.context_window
    if options.context_length is not None and window and options.context_length > window:
        raise LlmError(f"--context-length {options.context_length} is above the model's window of {window} tokens")
    if known is not None:
        notes.append(f"{where}: recognised by its sha256 ({model_file.sha256[:12]}…) as {known.display_name} ({KNOWN_MODELS_FILE})")
        if model.get("family") is None:
            model["family"] = known.family
        if model.get("context_length") is None and known.context_length is not None:
            model["context_length"] = min(known.context_length, window or known.context_length)
        if not model.get("stop"):
            model["stop"] = list(known.stop)
        if model.get("prompt_format") is None and known.prompt_format is not None:
            model["prompt_format"] = known.prompt_format
        if "generation_config" not in model and known.generation_config:
            model["generation_config"] = dict(known.generation_config)
        if not model.get("aliases") and known.aliases:
            model["aliases"] = list(known.aliases)
        if model.get("gguf_weights", "auto") == "auto" and known.gguf_weights is not None and facts.format == "gguf":
            model["gguf_weights"] = known.gguf_weights
        if model.get("license") is None:
            model["license"] = known.license
    else:
        sha = f"sha256 {model_file.sha256[:12]}…" if model_file.sha256 else "no single weights file to hash"
        notes.append(f"{where}: not in {KNOWN_MODELS_FILE} ({sha}): settings read from its own files")
        if model.get("context_length") is None:
            if window:
                model["context_length"] = min(window, DEFAULT_CONTEXT_CAP)
                guessed.append(("context_length", f"{model['context_length']} (the model's window is {window}; --context-length sets it)"))
            else:
                guessed.append(("context_length", "the service's default (the files name no window; --context-length sets it)"))
        if "generation_config" not in model:
            guessed.append(("generation_config", DEFAULT_GENERATIVE_CONFIG))
        if not facts.chat_template and not model.get("prompt_format"):
            guessed.append(("prompt_format", "Dream's plain Human:/AI: lines (no chat template in the files)"))
        if not facts.eos_tokens and not model.get("stop"):
            guessed.append(("stop", "none (the files name no end-of-generation token; --stop TEXT sets it)"))
    # The stop set always holds the model's own end-of-generation tokens.
    model["stop"] = list(dict.fromkeys([*model.get("stop", []), *facts.eos_tokens]))
    if model.get("license") is None:
        embedded = EMBEDDED_MODELS.get(located.requested)
        model["license"] = embedded.license if embedded is not None else facts.license
    # What an earlier run guessed stays guessed until this run's options set it.
    given = {name for name, value in (("context_length", options.context_length), ("stop", options.stop)) if value}
    earlier = [name for name in (model.get("derived") or {}).get("guessed", []) if name not in given]
    all_guessed = list(dict.fromkeys([*earlier, *(setting for setting, _ in guessed)]))
    model["derived"] = derived_from(facts, all_guessed).model_dump()
    if guessed:
        notes.append("guessed (check them in the card): " + "; ".join(f"{setting} {what}" for setting, what in guessed))
    return notes


def _fit_memory(card: Card, model_file: ModelFile, ram_option: str | None, *, kept: bool) -> tuple[Card, list[str]]:
    """The card with a ram_usage that holds the model's estimated need: the estimate, or a larger
    value the card already had; an explicit --ram-usage below the estimate is refused."""
    estimate = memory_estimate(card, model_file.facts)
    if estimate is None:
        return card, ["memory: the model's files do not give its dimensions; set --ram-usage"]
    needed = ram_usage_text(estimate.total)
    if ram_option is not None:
        if parse_size(ram_option) < estimate.total:
            raise LlmError(f"--ram-usage {ram_option} is below the model's estimated need, {estimate.explain()}")
        return card, [f"memory: {estimate.explain()}; ram_usage {card.ram_usage} (--ram-usage)"]
    if kept and parse_size(card.ram_usage) >= estimate.total:
        return card, [f"memory: {estimate.explain()}; ram_usage {card.ram_usage} holds it"]
    card = card.model_copy(update={"ram_usage": needed})
    return card, [f"memory: {estimate.explain()} → ram_usage {needed}"]


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


@dataclass
class AddedLlms:
    """What `add-llm` would do: each card with its notes, every file it changes, and what it skipped."""

    built: list[BuiltCard]
    plan: Plan
    skipped: list[str] = field(default_factory=list)


def plan_add_llm(repo: Repo, options: LlmOptions) -> AddedLlms:
    """The card and every file it changes; raises LlmError/CardError/YamlSyntaxError before writing."""
    return plan_add_llms(repo, [options])


def plan_add_llms(repo: Repo, options_list: list[LlmOptions], skipped: list[str] | None = None) -> AddedLlms:
    """Several cards at once (`--scan`): each gets the next free port, all in one plan."""
    cards = repo.load_valid_cards()
    try:
        known = load_known_models(repo.root)
    except KnownModelsError as error:
        raise LlmError("the model registry cannot be used:\n" + "\n".join(error.problems)) from None
    cache = ModelFileCache()
    known_dists = repo.distributions()
    add_to: dict[str, list[str]] = {}
    built: list[BuiltCard] = []
    for options in options_list:
        one = build_card(repo, options, cards, known=known, cache=cache)
        cards = {**cards, one.card.name: one.card}
        dists = options.dists or [dist for dist in known_dists if options.name in distribution_members(repo, dist)] or known_dists
        for dist in dists:
            if dist not in known_dists:
                raise LlmError(f"--dist {dist!r}: no assistant_dists/{dist}/{OVERRIDE}; known: {', '.join(known_dists) or 'none'}")
            add_to.setdefault(dist, []).append(one.card.name)
        built.append(one)
    plan = plan_generation(repo, cards, add_to=add_to)
    for one in built:
        card_path = f"components/{one.card.name}.yml"
        existing = repo.path(card_path)
        plan.files[card_path] = card_text(one.card, existing.read_text() if existing.is_file() else None, card_path)
    return AddedLlms(built, plan, list(skipped or []))


# --- a models folder ----------------------------------------------------------------------------

SCAN_PREFIX = "transformers-lm-"


def find_models(folder: Path) -> list[Path]:
    """Every .gguf file and transformers model folder (config.json) under `folder`, in name order."""
    found: list[Path] = []
    for current, subfolders, files in os.walk(folder):
        here = Path(current)
        if "config.json" in files:
            found.append(here)
            subfolders.clear()  # a model folder's own files are not models of their own
            continue
        subfolders.sort()
        found.extend(here / name for name in sorted(files) if name.lower().endswith(".gguf"))
    return found


def card_name_for(path: Path, taken: set[str]) -> str:
    """transformers-lm-<the file or folder name as a DNS label>, made unique among `taken`."""
    stem = path.stem if path.suffix.lower() == ".gguf" else path.name
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "model"
    base = (SCAN_PREFIX + slug)[:60].rstrip("-")
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name


def scan_options(repo: Repo, folder: Path, template: LlmOptions) -> tuple[list[LlmOptions], list[str]]:
    """One LlmOptions per model found under `folder` that no card serves from that path yet, and a
    line for each one skipped."""
    if not folder.is_dir():
        raise LlmError(f"--scan {folder}: not a folder")
    cards = repo.load_valid_cards()
    served: dict[Path, str] = {}
    for card in cards.values():
        if card.kind.reads_model_files:
            with contextlib.suppress(ModelSourceError):
                location = locate_model(repo.root, card.model.source).location
                if location is not None:
                    served[location.resolve()] = card.name
    taken = set(cards)
    found, skipped = [], []
    for path in find_models(folder.resolve()):
        if path.resolve() in served:
            skipped.append(f"{path}: already served by components/{served[path.resolve()]}.yml")
            continue
        name = card_name_for(path, taken)
        taken.add(name)
        found.append(dataclasses.replace(template, name=name, model=str(path)))
    if not found and not skipped:
        raise LlmError(f"--scan {folder}: no .gguf file and no model folder (config.json) in it")
    return found, skipped


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


__all__ = ["AddedLlms", "LlmError", "LlmOptions", "plan_add_llm", "plan_add_llms", "plan_remove_llm", "scan_options", "YamlSyntaxError"]
