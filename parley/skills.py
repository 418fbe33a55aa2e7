"""Adding and removing a prompted skill: Dream's template prompted skill, one more instance.

`parley add-skill NAME --prompt-file FILE.json --llm LLM` writes the skill's card and everything
generated from it (parley/kinds/skill.py). A prompt file already under common/prompts/ is used
where it is; one from elsewhere is copied, byte for byte, to common/prompts/<NAME>.json (a Dream
prompt file is taken as it is), and `--config` likewise to common/generative_configs/<NAME>.json;
such copies belong to the skill and go with it (`parley remove-skill`). Input is checked before
anything is written.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from common.lm_protocol import GenerationConfig
from parley.cards import DNS_LABEL, Card, CardError, card_to_data, generation_config_problems, key_env_var_problem, parse_card
from parley.generate import Plan, plan_generation
from parley.kinds.skill import PROMPTS_FOLDER, PromptedSkill, read_prompt_file
from parley.llms import card_text, check_port, distribution_members, free_port
from parley.repo import OVERRIDE, Repo

CARD_HEADER = (
    "# The card of a prompted skill: a prompt file and an LLM. Its service, pipeline entry and service_configs\n"
    "# are generated from it; after editing it, run `parley generate`.\n"
)
GENERATIVE_CONFIGS_FOLDER = "common/generative_configs"
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_RAM_USAGE = "256M"


class SkillError(ValueError):
    """Input refused before anything was written; the message says how to fix it."""


@dataclass
class SkillOptions:
    """What `parley add-skill` was given (None: keep the card's value or use the default)."""

    name: str
    prompt_file: Path | None = None
    llm: str | None = None
    dists: list[str] = field(default_factory=list)
    goals: str | None = None
    config: Path | None = None
    send_env: list[str] = field(default_factory=list)
    port: int | None = None


def _is_prompted_skill(card: Card) -> bool:
    return isinstance(card.kind, PromptedSkill)


def _resolve(repo: Repo, path: Path) -> Path:
    """A relative path that names a file of the repository is that file (common/prompts/x.json);
    any other path is taken as given (relative to the working directory)."""
    path = path.expanduser()
    if not path.is_absolute() and (repo.root / path).is_file():
        return repo.root / path
    return path


def _file_in_folder(repo: Repo, option: str, given: Path, folder: str, owned_name: str) -> tuple[str, str | None]:
    """(its path in the repository, the text to write there or None when it is there already): a
    file under `folder` is used in place; any other is copied to `folder/<owned_name>.json`."""
    path = _resolve(repo, given)
    if not path.is_file():
        raise SkillError(f"{option} {given}: no such file")
    text = path.read_text()
    target = repo.path(folder)
    if path.resolve().parent == target.resolve():
        return f"{folder}/{path.name}", None
    relative = f"{folder}/{owned_name}.json"
    existing = repo.path(relative)
    if existing.is_file() and existing.read_text() != text:
        raise SkillError(
            f"{option} {given}: it would be copied to {relative}, which exists and differs; "
            f"pass {relative} itself, or remove it first"
        )
    return relative, text


def build_card(repo: Repo, options: SkillOptions, cards: dict[str, Card]) -> tuple[Card, dict[str, str]]:
    """The card `parley add-skill` writes (the existing one updated with the options) and the files
    it copies in (repository path → text)."""
    if not DNS_LABEL.match(options.name):
        raise SkillError(
            f"NAME {options.name!r} is not a lowercase DNS label: use a-z, 0-9 and '-' (at most 63, no leading or "
            "trailing '-'), e.g. fairytale-prompted-skill"
        )
    existing = cards.get(options.name)
    if existing is not None and not _is_prompted_skill(existing):
        raise SkillError(f"components/{options.name}.yml is not a prompted skill: choose another name for the skill")
    data = card_to_data(existing) if existing is not None else {}
    skill = dict(data.get("skill") or {})
    copies: dict[str, str] = {}

    if options.prompt_file is not None:
        relative, text = _file_in_folder(repo, "--prompt-file", options.prompt_file, PROMPTS_FOLDER, options.name)
        content = text if text is not None else repo.path(relative).read_text()
        try:
            read_prompt_file(content)
        except ValueError as error:
            raise SkillError(f"--prompt-file {options.prompt_file}: {error}") from None
        if text is not None:
            copies[relative] = text
        skill["prompt_file"] = relative
    if "prompt_file" not in skill:
        raise SkillError('no prompt given: pass --prompt-file, a JSON file such as {"prompt": "You tell fairy tales.", "goals": "Tells fairy tales."}')

    if options.llm is not None:
        skill["llm"] = options.llm
    if "llm" not in skill:
        raise SkillError("no LLM given: pass --llm, the card name of an LLM (see MODELS.md)")
    llm = cards.get(skill["llm"])
    if llm is None or not llm.kind.serves_llm:
        known = ", ".join(sorted(name for name, card in cards.items() if card.kind.serves_llm)) or "none"
        raise SkillError(f"--llm {skill['llm']!r} is not an LLM card; the LLMs are {known} (add one with `parley add-llm`)")

    if options.config is not None:
        relative, text = _file_in_folder(repo, "--config", options.config, GENERATIVE_CONFIGS_FOLDER, options.name)
        content = text if text is not None else repo.path(relative).read_text()
        try:
            GenerationConfig.model_validate(json.loads(content))
        except json.JSONDecodeError as error:
            raise SkillError(f"--config {options.config}: not JSON (line {error.lineno}: {error.msg})") from None
        except ValidationError as error:
            raise SkillError(f"--config {options.config}: " + "; ".join(generation_config_problems(error))) from None
        if text is not None:
            copies[relative] = text
        skill["generative_config"] = relative
    if options.goals is not None:
        skill["goals"] = options.goals.strip() or None
    if options.send_env:
        for name in options.send_env:
            problem = key_env_var_problem(name)
            if problem:
                raise SkillError(f"--send-env {problem}")
        skill["send_env"] = list(options.send_env)

    connector = data.get("connector") or {}
    if options.port is not None:
        port = options.port
    elif existing is not None:
        port = existing.port
    else:
        port = free_port(cards, options.name, PromptedSkill.first_port)
    check_port(port, cards, options.name, SkillError)

    prompt = read_prompt_file(copies.get(skill["prompt_file"]) or repo.path(skill["prompt_file"]).read_text())
    goals = skill.get("goals") or (prompt.get("goals") or "").strip()
    data.update(
        {
            "name": options.name,
            "display_name": data.get("display_name") or options.name,
            "component_type": data.get("component_type", "Generative"),
            "model_type": data.get("model_type", "NN-based"),
            "is_customizable": data.get("is_customizable", True),
            "author": data.get("author") or "Parley maintainers",
            "description": data.get("description") or (f"Prompted skill: {goals}" if goals else f"Prompted skill with {skill['prompt_file']}"),
            "ram_usage": data.get("ram_usage") or DEFAULT_RAM_USAGE,
            "gpu_usage": data.get("gpu_usage"),
            "group": PromptedSkill.group,
            "connector": {
                "protocol": "http",
                "timeout": float(connector.get("timeout", DEFAULT_TIMEOUT_SECONDS)),
                "url": f"http://{options.name}:{port}/respond",
            },
            "dialog_formatter": data.get("dialog_formatter") or "state_formatters.dp_formatters:dff_prompted_skill_formatter",
            "response_formatter": data.get("response_formatter") or "state_formatters.dp_formatters:skill_with_attributes_formatter_service",
            "previous_services": data.get("previous_services") or ["skill_selectors"],
            "required_previous_services": data.get("required_previous_services"),
            "state_manager_method": data.get("state_manager_method") or "add_hypothesis",
            "tags": data.get("tags"),
            "endpoint": "respond",
            "service": PromptedSkill().service_config_dir(options.name),
            "date_created": data.get("date_created") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "skill": skill,
        }
    )
    try:
        return parse_card(data, f"components/{options.name}.yml"), copies
    except CardError as error:
        raise SkillError("the card would be invalid:\n" + "\n".join(error.problems)) from None


def plan_add_skill(repo: Repo, options: SkillOptions) -> tuple[Card, Plan]:
    """The card and every file it changes; raises SkillError/CardError/YamlSyntaxError before writing."""
    cards = repo.load_valid_cards()
    card, copies = build_card(repo, options, cards)
    known = repo.distributions()
    dists = options.dists or [dist for dist in known if options.name in distribution_members(repo, dist)] or known
    for dist in dists:
        if dist not in known:
            raise SkillError(f"--dist {dist!r}: no assistant_dists/{dist}/{OVERRIDE}; known: {', '.join(known) or 'none'}")
    plan = plan_generation(repo, {**cards, card.name: card}, add_to={dist: [card.name] for dist in dists}, new_files=dict(copies))
    plan.files.update(copies)
    card_path = f"components/{card.name}.yml"
    existing = repo.path(card_path)
    plan.files[card_path] = card_text(card, existing.read_text() if existing.is_file() else None, card_path, CARD_HEADER)
    return card, plan


def plan_remove_skill(repo: Repo, name: str) -> Plan:
    """The skill's card and everything generated from it, and the prompt file or config it copied in."""
    cards = repo.load_valid_cards()
    card = cards.get(name)
    if card is None or not _is_prompted_skill(card):
        skills = ", ".join(sorted(n for n, c in cards.items() if _is_prompted_skill(c))) or "none"
        what = "no card" if card is None else "not a prompted skill:"
        raise SkillError(f"{what} components/{name}.yml; the prompted skills are {skills}")
    plan = plan_generation(repo, {n: c for n, c in cards.items() if n != name}, removed=[name])
    plan.files[f"components/{name}.yml"] = None
    return plan


__all__ = ["SkillError", "SkillOptions", "plan_add_skill", "plan_remove_skill"]
