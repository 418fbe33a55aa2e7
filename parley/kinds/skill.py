"""The prompted skill kind: Dream's template prompted skill, one image (skills/prompted_skill) and
one more instance per card, each a prompt file and an LLM.

A skill card (`skill:` section: `prompt_file`, `llm`, optional `goals`, `generative_config`,
`send_env`, `n_utterances_context`) generates, in every distribution that runs it: its service in
the override (the one image, its environment, a healthcheck, the memory limit, `depends_on` every
LLM of the distribution), its dev.yml entry (a skill runs no model: no cpu.yml or proxy.yml entry),
its host:port in the agent's WAIT_HOSTS and the agent's `depends_on`, and its entry in the
distribution's pipeline_conf.json (the card's connector, formatters and state method, and the
`goals` the agent's skill selector ranks); and once, its service_configs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import SingleQuotedScalarString

from parley.api_keys import secret_env_file
from parley.kinds import BASE_IMAGE, DEV, DistContext, Kind, block, dev_entry, flow, healthy, http_health_test, memory_limit
from parley.kinds.llm import generative_config_path

if TYPE_CHECKING:
    from parley.cards import Card

PACKAGE = "skills/prompted_skill"
# The skill gives up on its LLM this long before the agent gives up on the skill, so a slow LLM
# still yields the skill's own "no hypothesis" answer rather than the agent's timeout.
LLM_TIMEOUT_MARGIN_SECONDS = 5.0
PROMPTS_FOLDER = "common/prompts"


def llm_endpoints(llms: list["Card"]) -> dict[str, Any]:
    """The skill's LLM_ENDPOINTS: each LLM's /respond URL, the key env vars it may receive, its generative config."""
    return {
        card.respond_url: {
            "key_env_vars": list(card.model.key_env_vars),  # type: ignore[union-attr]
            "generative_config": generative_config_path(card.name),
        }
        for card in llms
    }


def read_prompt_file(text: str) -> dict[str, Any]:
    """Dream's prompt file: a JSON object with a non-empty "prompt" (and maybe "goals"); ValueError otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise ValueError('must be Dream\'s JSON prompt file: {"prompt": "...", "goals": "..."}')
    if data.get("goals") is not None and not isinstance(data["goals"], str):
        raise ValueError('"goals" must be a text')
    return data


class PromptedSkill(Kind):
    name = "prompted-skill"
    description = "a prompt and an LLM (skills/prompted_skill, one image for every such skill)"
    group = "skills"
    section = "skill"
    package = PACKAGE
    first_port = 8147
    endpoints = ("respond",)
    calls_llms = True
    in_pipeline = True
    requires_field = "skill.llm"
    has_service_configs = True

    def remove_command(self, card_name: str) -> str:
        return f"`parley remove-skill {card_name}`"

    def requires(self, card: "Card") -> list[str]:
        assert card.skill is not None
        return [card.skill.llm]

    def bundle_problems(self, card: "Card", cards: dict[str, "Card"], read: Callable[[str], str | None]) -> list[str]:
        skill = card.skill
        assert skill is not None
        problems = []
        llm = cards.get(skill.llm)
        if llm is None or not llm.kind.serves_llm:
            known = ", ".join(sorted(name for name, other in cards.items() if other.kind.serves_llm)) or "none"
            problems.append(f"skill.llm: {skill.llm!r} is not an LLM card (LLMs: {known})")
        text = read(skill.prompt_file)
        if text is None:
            problems.append(f"skill.prompt_file: {skill.prompt_file} does not exist")
        else:
            try:
                read_prompt_file(text)
            except ValueError as error:
                problems.append(f"skill.prompt_file: {skill.prompt_file}: {error}")
        if skill.generative_config is not None and read(skill.generative_config) is None:
            problems.append(f"skill.generative_config: {skill.generative_config} does not exist")
        return problems

    def goals(self, card: "Card", read: Callable[[str], str | None]) -> str | None:
        """What the skill is for, as the agent's skill selector ranks it: the card's goals, else the
        prompt file's, else the prompt itself (Dream's prompt selector ranks goals)."""
        assert card.skill is not None
        if card.skill.goals:
            return card.skill.goals
        text = read(card.skill.prompt_file)
        try:
            data = read_prompt_file(text) if text is not None else None
        except ValueError:
            data = None
        if data is None:
            return None
        return (data.get("goals") or "").strip() or data["prompt"].strip()

    def environment(self, card: "Card", ctx: DistContext) -> dict[str, Any]:
        skill = card.skill
        assert skill is not None
        environment: dict[str, Any] = {
            "SERVICE_NAME": card.pipeline_name,
            "SERVICE_PORT": card.port,
            "PROMPT_FILE": skill.prompt_file,
        }
        llm = ctx.cards.get(skill.llm)
        if llm is not None:
            environment["GENERATIVE_SERVICE_URL"] = llm.respond_url
        if skill.generative_config:
            environment["GENERATIVE_SERVICE_CONFIG"] = skill.generative_config
        timeout = max(1.0, card.connector.timeout - LLM_TIMEOUT_MARGIN_SECONDS)
        environment["GENERATIVE_TIMEOUT"] = int(timeout) if timeout.is_integer() else timeout
        environment["N_UTTERANCES_CONTEXT"] = skill.n_utterances_context
        if skill.send_env:
            environment["ENVVARS_TO_SEND"] = ",".join(skill.send_env)
            for variable in skill.send_env:
                environment[variable] = f"${{{variable}:-}}"  # the value from the shell or .env, never a file of ours
        endpoints = json.dumps(llm_endpoints(ctx.llms), separators=(", ", ": "))
        environment["LLM_ENDPOINTS"] = SingleQuotedScalarString(endpoints)
        return environment

    def healthcheck(self, card: "Card") -> CommentedMap:
        check = block({"test": None, "interval": "5s", "timeout": "5s", "retries": 24, "start_period": "10s"})
        check["test"] = http_health_test(card.port, 3)
        return check

    def depends_on(self, card: "Card", ctx: DistContext) -> list[str]:
        return [llm.name for llm in ctx.llms]

    def compose_service(self, card: "Card", ctx: DistContext) -> CommentedMap:
        service = block({"build": {"context": ".", "dockerfile": f"{PACKAGE}/Dockerfile", "args": {"BASE_IMAGE": BASE_IMAGE}}})
        service["init"] = True
        service["env_file"] = flow([secret_env_file()])
        service["environment"] = block(self.environment(card, ctx))
        service["healthcheck"] = self.healthcheck(card)
        service["deploy"] = memory_limit(card)
        service["restart"] = "unless-stopped"
        dependencies = self.depends_on(card, ctx)
        if dependencies:
            service["depends_on"] = healthy(dependencies)
        return service

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        if overlay == DEV:
            return dev_entry(card, [PACKAGE, "common"])
        return None

    def pipeline_entry(self, card: "Card", ctx: DistContext) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "connector": {"protocol": card.connector.protocol, "timeout": card.connector.timeout, "url": card.connector.url},
            "dialog_formatter": card.dialog_formatter,
            "response_formatter": card.response_formatter,
            "previous_services": list(card.previous_services or ["skill_selectors"]),
            "state_manager_method": card.state_manager_method or "add_hypothesis",
            "is_enabled": True,
        }
        entry = {key: value for key, value in entry.items() if value is not None}
        goals = self.goals(card, ctx.read)
        if goals:
            entry["goals"] = goals
        entry["source"] = {"directory": PACKAGE, "container": card.name, "endpoint": card.endpoint or "respond"}
        return entry

    def named_files(self, card: "Card") -> list[str]:
        assert card.skill is not None
        return [path for path in (card.skill.prompt_file, card.skill.generative_config) if path]

    def owned_files(self, card_name: str) -> list[str]:
        # A prompt file or generative config that `parley add-skill` copied in is named after the skill.
        return [f"{PROMPTS_FOLDER}/{card_name}.json", generative_config_path(card_name)]


def register_kinds(register) -> None:
    register(PromptedSkill)
