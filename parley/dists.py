"""New distributions and components added to them: `parley new-dist` and `parley add-component`.

A distribution has the files Dream's have: `docker-compose.override.yml` (its services over the
base compose file), `dev.yml`, `cpu.yml`, `proxy.yml`, `postgres.yml` and `pipeline_conf.json` with
its `metadata` (display name, author, description, version, date, the memory its components need).
`new-dist` writes a fresh one (the agent; the skills and LLMs named; Dream's pipeline with the
description-based skill selector and the confidence response selector) or copies another (`--from`:
its hand-written parts too), and then generates every component's part from the cards, so the new
distribution runs at once (`parley up`, `docker compose`, `parley stack`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass

from parley.cards import Card, CardError
from parley.generate import OVERLAY_HEADER, Plan, dist_members, pipeline_text, plan_generation
from parley.repo import OVERLAYS, OVERRIDE, PIPELINE, Repo
from parley.yamlio import YamlSyntaxError, dump_yaml, load_yaml_text

DIST_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
LANGUAGES = ("EN", "RU")
# The agent's special answers, per language (Dream's texts in English).
LAST_CHANCE = {
    "EN": "Sorry, something went wrong inside. Please tell me, what did you say.",
    "RU": "Извините, что-то пошло не так. Пожалуйста, повторите, что вы сказали.",
}
TIMEOUT = {
    "EN": "Sorry, I need to think more on that. Let's talk about something else.",
    "RU": "Извините, мне нужно подумать над этим подольше. Давайте поговорим о чём-нибудь другом.",
}
OVERLAY_NOTES = {
    "dev.yml": "# Development overlay: ports published on this machine only (127.0.0.1) and the source folders\n"
               "# mounted read-only over the image's copy, so a restart picks up local edits.",
    "cpu.yml": "# CPU overlay: run every model on the CPU (an entry per LLM service that runs a model here).",
    "proxy.yml": "# Proxy overlay: replaces each LLM that runs a model with nginx forwarding to a host that already\n"
                 "# runs it ($PARLEY_PROXY_HOST, default: the Docker host). The agent and the skills always run locally.",
    "postgres.yml": "# Shared-state overlay: the agents keep their dialogs in PostgreSQL (components/postgres.yml), so\n"
                    "# `parley stack --overlay postgres.yml` runs the agent as several replicas. Set\n"
                    "# PARLEY_POSTGRES_PASSWORD in .env (its default suits only a database nothing outside reaches).",
}


class DistError(ValueError):
    """Input refused before anything was written; the message says how to fix it."""


@dataclass
class NewDistOptions:
    name: str
    from_dist: str | None = None
    skills: list[str] | None = None  # None: --from's, else none
    llms: list[str] | None = None  # None: --from's, else those the skills need
    language: str | None = None  # None: --from's, else EN
    description: str | None = None


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _title(name: str) -> str:
    """A display name: `universal_ru_prompted_assistant` → "Universal RU Prompted Assistant"."""
    return " ".join(word.upper() if len(word) <= 2 else word.capitalize() for word in name.split("_"))


def _check_members(cards: dict[str, Card], names: list[str], option: str, wanted: str) -> None:
    for name in names:
        card = cards.get(name)
        if card is None:
            raise DistError(f"{option} {name!r}: no card components/{name}.yml")
        fits = card.kind.in_pipeline if wanted == "skill" else card.kind.serves_llm
        if not fits:
            raise DistError(f"{option} {name!r}: components/{name}.yml is not {'a skill' if wanted == 'skill' else 'an LLM'}")


def _fresh_files(name: str, language: str, description: str | None, skills: list[str]) -> dict[str, str]:
    """A new distribution's hand-written parts; the components' parts are generated over them."""
    override = (
        f"{OVERLAY_HEADER}\n"
        f"# {_title(name)}: the agent routes each turn to the skill whose goals fit it\n"
        "# (DescriptionBasedSkillSelectorConnector), which asks an LLM. Components are added with\n"
        "# `parley add-skill`, `parley add-llm` and `parley add-component ... --dist " + name + "`.\n"
        "services:\n"
        "  agent:\n"
        "    environment:\n"
        f"      PIPELINE_CONFIG: assistant_dists/{name}/{PIPELINE}\n"
        f"      LANGUAGE: {language}\n"
    )
    files = {f"assistant_dists/{name}/{OVERRIDE}": override}
    for overlay in OVERLAYS:
        files[f"assistant_dists/{name}/{overlay}"] = f"{OVERLAY_HEADER}\n{OVERLAY_NOTES.get(overlay, '')}\nservices:\n"
    special = {"state_manager_method": "add_bot_utterance_last_chance"}
    pipeline = {
        "services": {
            "last_chance_service": {
                "connector": {"protocol": "python", "class_name": "PredefinedTextConnector", "response_text": LAST_CHANCE[language]},
                **special,
                "tags": ["last_chance"],
            },
            "timeout_service": {
                "connector": {"protocol": "python", "class_name": "PredefinedTextConnector", "response_text": TIMEOUT[language]},
                **special,
                "tags": ["timeout"],
            },
            "skill_selectors": {
                "description_based_skill_selector": {
                    "connector": {"protocol": "python", "class_name": "DescriptionBasedSkillSelectorConnector", "top_n": 1},
                    "response_formatter": "state_formatters.dp_formatters:simple_formatter_service",
                    "tags": ["selector"],
                    "is_enabled": True,
                }
            },
            "skills": {},
            "response_selectors": {
                "confidence_selector": {
                    "connector": {"protocol": "python", "class_name": "ConfidenceResponseSelectorConnector"},
                    "response_formatter": "state_formatters.dp_formatters:base_response_selector_formatter_service",
                    "previous_services": ["skills"],
                    "state_manager_method": "add_bot_utterance",
                    "is_enabled": True,
                }
            },
        },
        "metadata": {
            "display_name": _title(name),
            "author": "Parley maintainers",
            "description": description or (
                f"Prompted skills ({', '.join(skills)}), each turn answered by the one whose goals fit it."
                if skills else "A distribution of Parley."
            ),
            "version": "0.1.0",
            "date_created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "language": language,
            "ram_usage": "0M",
            "gpu_usage": "0M",
        },
    }
    files[f"assistant_dists/{name}/{PIPELINE}"] = pipeline_text(pipeline)
    return files


def _copied_files(repo: Repo, source: str, name: str, language: str | None, description: str | None) -> tuple[dict[str, str], str]:
    """DIST's files as NAME's (its paths renamed, its metadata and language set); and its language."""
    files = {}
    for file_name in (OVERRIDE, *OVERLAYS, PIPELINE):
        path = repo.path(repo.dist_file(source, file_name))
        if path.is_file():
            files[repo.dist_file(name, file_name)] = path.read_text().replace(f"assistant_dists/{source}/", f"assistant_dists/{name}/")
    override_path = repo.dist_file(name, OVERRIDE)
    override = load_yaml_text(files[override_path], override_path)
    environment = ((override.get("services") or {}).get("agent") or {}).get("environment") or {}
    old_language = str(environment.get("LANGUAGE") or "EN").upper() if isinstance(environment, dict) else "EN"
    language = language or old_language
    if isinstance(environment, dict) and (language != "EN" or "LANGUAGE" in environment):
        environment["LANGUAGE"] = language
        files[override_path] = dump_yaml(override)
    pipeline_path = repo.dist_file(name, PIPELINE)
    if pipeline_path in files:
        pipeline = json.loads(files[pipeline_path])
        services = pipeline.get("services") or {}
        for key, texts in (("last_chance_service", LAST_CHANCE), ("timeout_service", TIMEOUT)):
            connector = (services.get(key) or {}).get("connector") or {}
            if connector.get("response_text") in texts.values():
                connector["response_text"] = texts[language]
        metadata = pipeline.setdefault("metadata", {})
        metadata["display_name"] = _title(name)
        metadata["date_created"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        if description:
            metadata["description"] = description
        if "language" in metadata or language != "EN":
            metadata["language"] = language
        files[pipeline_path] = pipeline_text(pipeline)
    return files, language


def plan_new_dist(repo: Repo, options: NewDistOptions) -> Plan:
    """Every file of the new distribution; raises DistError/CardError/YamlSyntaxError before writing."""
    if not DIST_NAME.match(options.name):
        raise DistError(f"NAME {options.name!r}: use a-z, 0-9 and '_', starting with a letter, e.g. travel_assistant")
    known = repo.distributions()
    if options.name in known:
        raise DistError(f"assistant_dists/{options.name} exists: add components to it with `parley add-component CARD --dist {options.name}`")
    if options.from_dist is not None and options.from_dist not in known:
        raise DistError(f"--from {options.from_dist!r}: no assistant_dists/{options.from_dist}/{OVERRIDE}; known: {', '.join(known) or 'none'}")
    if options.language is not None and options.language.upper() not in LANGUAGES:
        raise DistError(f"--language {options.language!r}: one of {', '.join(LANGUAGES)}")
    language = options.language.upper() if options.language else None
    cards = repo.load_valid_cards()
    skills, llms = _split(options.skills), _split(options.llms)
    _check_members(cards, skills or [], "--skills", "skill")
    _check_members(cards, llms or [], "--llms", "llm")

    dropped: list[str] = []
    if options.from_dist is not None:
        files, language = _copied_files(repo, options.from_dist, options.name, language, options.description)
        override_path = repo.dist_file(options.from_dist, OVERRIDE)
        members = dist_members(load_yaml_text(repo.path(override_path).read_text(), override_path), cards)
        if skills is not None:
            dropped += [name for name in members if cards[name].kind.in_pipeline and name not in skills]
        if llms is not None:
            dropped += [name for name in members if cards[name].kind.serves_llm and name not in llms]
    else:
        language = language or "EN"
        files = _fresh_files(options.name, language, options.description, skills or [])
    wanted = [*(skills or []), *(llms or [])]
    plan = plan_generation(repo, cards, add_to={options.name: wanted}, drop_from={options.name: dropped}, new_files=dict(files))
    for relative, text in files.items():
        plan.files.setdefault(relative, text)
    return plan


def plan_add_component(repo: Repo, name: str, dists: list[str]) -> Plan:
    """Every file that changes when the distributions run the component (and what it requires)."""
    cards = repo.load_valid_cards()
    card = cards.get(name)
    if card is None:
        raise DistError(f"no card components/{name}.yml: the cards are {', '.join(sorted(cards)) or 'none'}")
    if not card.kind.generated:
        raise DistError(f"components/{name}.yml is {card.kind.description}: add its service to the distribution's {OVERRIDE} by hand")
    if card.kind.routes_turns or card.kind.stores_dialogs:
        raise DistError(f"components/{name}.yml ({card.kind.name}) is in every distribution already")
    known = repo.distributions()
    if not dists:
        raise DistError(f"name the distribution: --dist DIST (one of {', '.join(known) or 'none'})")
    for dist in dists:
        if dist not in known:
            raise DistError(f"--dist {dist!r}: no assistant_dists/{dist}/{OVERRIDE}; known: {', '.join(known) or 'none'}")
    return plan_generation(repo, cards, add_to={dist: [name] for dist in dists})


__all__ = ["DistError", "NewDistOptions", "plan_add_component", "plan_new_dist", "CardError", "YamlSyntaxError"]
