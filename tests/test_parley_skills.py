"""Prompted skills and distributions are one command each, undone byte for byte, and `parley check`
verifies every port, URL, healthcheck and connector the cards generate. The component kinds register.

Every test works on a temporary copy of the repository's bundle (cards, distributions, services),
through the CLI in-process. The same commands' results run as real processes in
tests/test_new_dist_parley_up.py and tests/test_multiskill_parley_up.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML
from support.servers import REPO_ROOT

from parley import kinds
from parley.cli import cli
from parley.repo import Repo

DIST = "universal_prompted_assistant"
MULTI = "multiskill_assistant"
OVERRIDE = f"assistant_dists/{DIST}/docker-compose.override.yml"
BUNDLE = [".env", "docker-compose.yml", "components.tsv", "MODELS.md", "components", "assistant_dists", "common", "services", "skills"]
# A Dream prompt file as Dream ships them (escaped quotes, a goals line), taken as it is.
DREAM_PROMPT = (
    '{\n    "prompt": "TASK:\\nYou are a guide to the night sky. Answer questions about stars, planets and '
    'constellations.\\n\\nINSTRUCTION:\\nA human enters the conversation. Say \\u2018Hi!\\u2019 first.",\n'
    '    "goals": "Answers questions about astronomy: stars, planets, constellations, telescopes."\n}'
)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's bundle, as `parley` sees it."""
    root = tmp_path / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in BUNDLE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    return root


@pytest.fixture
def dream_prompt(tmp_path: Path) -> Path:
    path = tmp_path / "downloads" / "astronomy.json"
    path.parent.mkdir()
    path.write_text(DREAM_PROMPT)
    return path


def parley(root: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [*args, "--repo", str(root)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def snapshot(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def read(root: Path, relative: str) -> str:
    return (root / relative).read_text()


def compose(root: Path, relative: str) -> dict:
    return YAML(typ="safe").load(read(root, relative))


def pipeline(root: Path, dist: str) -> dict:
    return json.loads(read(root, f"assistant_dists/{dist}/pipeline_conf.json"))


def add_astronomy(root: Path, prompt: Path, *more: str) -> str:
    return parley(root, "add-skill", "astronomy-prompted-skill", "--prompt-file", str(prompt),
                  "--llm", "transformers-lm-smollm2", "--dist", DIST, *more)


# --- the kinds -----------------------------------------------------------------------------------


def test_every_shipped_card_is_of_the_kind_its_component_is():
    cards = Repo(REPO_ROOT).load_valid_cards()

    found = {name: card.kind.name for name, card in cards.items()}

    assert found["agent"] == "agent"
    assert found["postgres"] == "state-store"
    assert found["transformers-lm-smollm2"] == "local-llm"
    for name in ("prompted-skill", "fairytales-prompted-skill", "cooking-prompted-skill", "travel-prompted-skill",
                 "universal-ru-prompted-skill"):
        assert found[name] == "prompted-skill"


def test_a_kind_registered_by_a_module_of_its_own_generates_its_service_without_touching_generate(checkout, tmp_path, monkeypatch):
    # given: a module with a `register_kinds` hook, and a card of its kind
    (tmp_path / "echo_kind.py").write_text(textwrap.dedent('''
        from parley.kinds import Kind, block, dev_entry, http_health_test

        class EchoService(Kind):
            name = "echo-service"
            description = "a service that echoes"
            group = "echo"
            package = "services/agent"

            def compose_service(self, card, ctx):
                service = block({"build": {"context": ".", "dockerfile": "services/agent/Dockerfile"}})
                service["environment"] = block({"SERVICE_PORT": card.port})
                service["healthcheck"] = block({"test": http_health_test(card.port, 3)})
                return service

            def overlay_service(self, card, overlay, ctx):
                return dev_entry(card, ["services/agent"]) if overlay == "dev.yml" else None

        def register_kinds(register):
            register(EchoService)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(kinds, "KIND_MODULES", ("echo_kind", *kinds.KIND_MODULES))
    kinds.registry.cache_clear()
    try:
        card = read(checkout, "components/agent.yml").replace("name: agent", "name: echo").replace("group: agent", "group: echo")
        (checkout / "components/echo.yml").write_text(card.replace("http://agent:4242/", "http://echo:4300/").replace("deploy:\n  replicas: 2\n", ""))

        # when: it is added to a distribution
        parley(checkout, "add-component", "echo", "--dist", DIST)

        # then: its service and dev entry come from its kind, and the agent waits for it
        override = compose(checkout, OVERRIDE)
        assert override["services"]["echo"]["environment"]["SERVICE_PORT"] == 4300
        assert "echo:4300" in override["services"]["agent"]["environment"]["WAIT_HOSTS"]
        assert compose(checkout, f"assistant_dists/{DIST}/dev.yml")["services"]["echo"]["ports"] == ["127.0.0.1:4300:4300"]
        assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"
    finally:
        kinds.registry.cache_clear()
        sys.modules.pop("echo_kind", None)


# --- add-skill and remove-skill ------------------------------------------------------------------


def test_adding_a_skill_wires_every_file_and_check_passes(checkout: Path, dream_prompt: Path):
    add_astronomy(checkout, dream_prompt)

    assert parley(checkout, "check") == "ok: the bundle is consistent\n"  # the Compose validator on every overlay too
    assert read(checkout, "common/prompts/astronomy-prompted-skill.json") == DREAM_PROMPT  # taken as it is
    card = read(checkout, "components/astronomy-prompted-skill.yml")
    assert "url: http://astronomy-prompted-skill:8152/respond" in card  # the first free port from 8147
    assert "prompt_file: common/prompts/astronomy-prompted-skill.json" in card
    assert "8152\tastronomy-prompted-skill\n" in read(checkout, "components.tsv")
    override = compose(checkout, OVERRIDE)
    service = override["services"]["astronomy-prompted-skill"]
    assert service["build"]["dockerfile"] == "skills/prompted_skill/Dockerfile"  # the one skill image
    assert service["environment"]["SERVICE_PORT"] == 8152
    assert service["environment"]["PROMPT_FILE"] == "common/prompts/astronomy-prompted-skill.json"
    assert service["environment"]["GENERATIVE_SERVICE_URL"] == "http://transformers-lm-smollm2:8180/respond"
    assert "http://127.0.0.1:8152/health" in service["healthcheck"]["test"][-1]
    assert service["depends_on"] == {"transformers-lm-smollm2": {"condition": "service_healthy"}}
    agent = override["services"]["agent"]
    assert agent["environment"]["WAIT_HOSTS"] == "prompted-skill:8147, transformers-lm-smollm2:8180, astronomy-prompted-skill:8152"
    assert agent["depends_on"]["astronomy-prompted-skill"] == {"condition": "service_healthy"}
    assert compose(checkout, f"assistant_dists/{DIST}/dev.yml")["services"]["astronomy-prompted-skill"]["ports"] == ["127.0.0.1:8152:8152"]
    assert "astronomy-prompted-skill" not in (compose(checkout, f"assistant_dists/{DIST}/cpu.yml")["services"] or {})  # it runs no model
    entry = pipeline(checkout, DIST)["services"]["skills"]["astronomy_prompted_skill"]
    assert entry["connector"] == {"protocol": "http", "timeout": 60.0, "url": "http://astronomy-prompted-skill:8152/respond"}
    assert entry["goals"] == "Answers questions about astronomy: stars, planets, constellations, telescopes."
    assert entry["source"]["container"] == "astronomy-prompted-skill"
    for file_name in ("environment.yml", "service.yml"):
        assert (checkout / f"skills/prompted_skill/service_configs/astronomy-prompted-skill/{file_name}").is_file()


def test_removing_a_skill_restores_the_tree_byte_for_byte(checkout: Path, dream_prompt: Path):
    before = snapshot(checkout)
    add_astronomy(checkout, dream_prompt)
    parley(checkout, "add-skill", "travel-2-prompted-skill", "--prompt-file", "common/prompts/travel.json",
           "--llm", "transformers-lm-smollm2", "--dist", DIST, "--goals", "Plans trips.", "--send-env", "OPENAI_API_KEY")
    assert snapshot(checkout) != before

    parley(checkout, "remove-skill", "astronomy-prompted-skill")
    parley(checkout, "remove-skill", "travel-2-prompted-skill")

    assert snapshot(checkout) == before  # the copied prompt goes, common/prompts/travel.json stays


def test_adding_the_same_skill_twice_changes_nothing_the_second_time(checkout: Path, dream_prompt: Path):
    add_astronomy(checkout, dream_prompt)
    after_first = snapshot(checkout)

    output = add_astronomy(checkout, dream_prompt)

    assert snapshot(checkout) == after_first
    assert "nothing to change" in output


def test_the_shipped_skills_are_exactly_what_add_skill_writes(checkout: Path):
    before = snapshot(checkout)

    for name, prompt in (("fairytales", "fairytales"), ("cooking", "cooking"), ("travel", "travel")):
        output = parley(checkout, "add-skill", f"{name}-prompted-skill", "--prompt-file", f"common/prompts/{prompt}.json",
                        "--llm", "transformers-lm-smollm2", "--dist", MULTI)
        assert "nothing to change" in output

    assert snapshot(checkout) == before


def test_the_skill_reads_every_setting_its_card_generates(checkout: Path, dream_prompt: Path, tmp_path: Path):
    from skills.prompted_skill.settings import Settings

    config = tmp_path / "greedy.json"
    config.write_text('{"do_sample": false, "max_new_tokens": 32}')
    add_astronomy(checkout, dream_prompt, "--config", str(config), "--send-env", "OPENAI_API_KEY")
    environment = {key: str(value) for key, value in compose(checkout, OVERRIDE)["services"]["astronomy-prompted-skill"]["environment"].items()}
    environment = {key: value.replace("common/", f"{checkout}/common/", 1) if key in ("PROMPT_FILE", "GENERATIVE_SERVICE_CONFIG") else value
                   for key, value in environment.items()}

    settings = Settings.from_env({**environment, "OPENAI_API_KEY": "sk-astronomy"})

    assert settings.prompt.startswith("TASK:\nYou are a guide to the night sky.")
    assert settings.service_port == 8152
    assert settings.generative_service_url == "http://transformers-lm-smollm2:8180/respond"
    assert settings.generative_timeout == 55  # the card's connector timeout, less the skill's margin
    assert settings.envvars_to_send == ("OPENAI_API_KEY",)
    assert environment["GENERATIVE_SERVICE_CONFIG"].endswith("common/generative_configs/astronomy-prompted-skill.json")
    assert environment["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"  # from the shell or .env, never written here


@pytest.mark.parametrize(
    "args, message",
    [
        (["Astronomy", "--llm", "transformers-lm-smollm2"], "is not a lowercase DNS label"),
        (["astronomy", "--llm", "transformers-lm-smollm2"], "no prompt given: pass --prompt-file"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "no-such-llm"], "--llm 'no-such-llm' is not an LLM card"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "agent"], "--llm 'agent' is not an LLM card"),
        (["astronomy", "--prompt-file", "PROMPT"], "no LLM given: pass --llm"),
        (["astronomy", "--prompt-file", "NOT_JSON", "--llm", "transformers-lm-smollm2"], "not JSON"),
        (["astronomy", "--prompt-file", "NO_PROMPT", "--llm", "transformers-lm-smollm2"], "must be Dream's JSON prompt file"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "transformers-lm-smollm2", "--port", "8180"], "--port 8180 is taken by transformers-lm-smollm2"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "transformers-lm-smollm2", "--send-env", "lower"], "--send-env 'lower' is not an env var name"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "transformers-lm-smollm2", "--config", "BAD_CONFIG"], "do_sampel: unknown key"),
        (["astronomy", "--prompt-file", "PROMPT", "--llm", "transformers-lm-smollm2", "--dist", "nowhere"], "--dist 'nowhere': no assistant_dists/nowhere"),
        (["transformers-lm-smollm2", "--prompt-file", "PROMPT", "--llm", "transformers-lm-smollm2"], "is not a prompted skill"),
    ],
)
def test_bad_skill_input_is_refused_with_a_fix_and_nothing_is_written(checkout: Path, dream_prompt: Path, tmp_path: Path, args, message):
    files = {"PROMPT": dream_prompt, "NOT_JSON": tmp_path / "not.json", "NO_PROMPT": tmp_path / "no-prompt.json", "BAD_CONFIG": tmp_path / "bad.json"}
    files["NOT_JSON"].write_text("prompt: yaml")
    files["NO_PROMPT"].write_text('{"goals": "Nothing to say."}')
    files["BAD_CONFIG"].write_text('{"do_sampel": true}')
    before = snapshot(checkout)

    output = parley(checkout, "add-skill", *[str(files.get(arg, arg)) for arg in args], code=1)

    assert message in output
    assert snapshot(checkout) == before


def test_remove_skill_refuses_what_is_not_a_prompted_skill(checkout: Path):
    assert "not a prompted skill: components/transformers-lm-smollm2.yml" in parley(checkout, "remove-skill", "transformers-lm-smollm2", code=1)
    assert "no card components/nothing.yml; the prompted skills are" in parley(checkout, "remove-skill", "nothing", code=1)


def test_an_llm_a_skill_asks_cannot_be_removed_before_the_skill(checkout: Path):
    output = parley(checkout, "remove-llm", "transformers-lm-smollm2", code=1)

    assert "components/cooking-prompted-skill.yml: skill.llm" in output


# --- new-dist and add-component ------------------------------------------------------------------


def test_a_new_distribution_has_every_file_dreams_have_and_check_passes(checkout: Path):
    parley(checkout, "new-dist", "kitchen_assistant", "--skills", "cooking-prompted-skill")

    assert parley(checkout, "check") == "ok: the bundle is consistent\n"
    folder = checkout / "assistant_dists/kitchen_assistant"
    assert sorted(path.name for path in folder.iterdir()) == [
        "autoscaler.yml", "cpu.yml", "dev.yml", "docker-compose.override.yml", "monitoring.yml", "pipeline_conf.json",
        "postgres.yml", "proxy.yml"]
    override = compose(checkout, "assistant_dists/kitchen_assistant/docker-compose.override.yml")
    assert list(override["services"]) == ["agent", "cooking-prompted-skill", "transformers-lm-smollm2"]  # the skill's LLM came along
    assert override["services"]["agent"]["environment"]["PIPELINE_CONFIG"] == "assistant_dists/kitchen_assistant/pipeline_conf.json"
    conf = pipeline(checkout, "kitchen_assistant")
    assert list(conf["services"]["skills"]) == ["cooking_prompted_skill"]
    assert conf["services"]["skill_selectors"]["description_based_skill_selector"]["connector"]["class_name"] == "DescriptionBasedSkillSelectorConnector"
    metadata = conf["metadata"]
    assert metadata["display_name"] == "Kitchen Assistant" and metadata["version"] == "0.1.0" and metadata["author"]
    assert metadata["ram_usage"] == "2G"  # the agent 256M, the skill 256M, the LLM 1536M
    assert "kitchen_assistant" in read(checkout, "MODELS.md")


def test_a_new_distribution_runs_as_a_swarm_stack_at_once(checkout: Path, tmp_path: Path):
    parley(checkout, "new-dist", "kitchen_assistant", "--skills", "cooking-prompted-skill")

    parley(checkout, "stack", "kitchen_assistant", "--overlay", "cpu.yml", "-o", str(tmp_path / "stack.yml"))

    stack = YAML(typ="safe").load((tmp_path / "stack.yml").read_text())
    # the LLM's card autoscales, so the stack has the autoscaler too
    assert sorted(stack["services"]) == ["agent", "autoscaler", "cooking-prompted-skill", "transformers-lm-smollm2"]
    assert stack["services"]["cooking-prompted-skill"]["image"] == "parley-cooking-prompted-skill"


def test_a_distribution_from_another_in_russian_keeps_its_hand_written_parts(checkout: Path):
    parley(checkout, "new-dist", "kitchen_ru_assistant", "--from", MULTI, "--skills", "cooking-prompted-skill", "--language", "RU")

    assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"
    override = compose(checkout, "assistant_dists/kitchen_ru_assistant/docker-compose.override.yml")
    assert list(override["services"]) == ["agent", "transformers-lm-smollm2", "cooking-prompted-skill"]
    assert override["services"]["agent"]["environment"]["LANGUAGE"] == "RU"
    assert override["services"]["agent"]["environment"]["WAIT_HOSTS"] == "transformers-lm-smollm2:8180, cooking-prompted-skill:8149"
    conf = pipeline(checkout, "kitchen_ru_assistant")
    assert list(conf["services"]["skills"]) == ["cooking_prompted_skill"]
    assert conf["services"]["last_chance_service"]["connector"]["response_text"].startswith("Извините")
    assert conf["metadata"]["language"] == "RU" and conf["metadata"]["display_name"] == "Kitchen RU Assistant"
    assert "fairytales-prompted-skill" not in read(checkout, "assistant_dists/kitchen_ru_assistant/dev.yml")


@pytest.mark.parametrize("args, message", [
    (["universal_prompted_assistant"], "assistant_dists/universal_prompted_assistant exists"),
    (["Kitchen"], "use a-z, 0-9 and '_'"),
    (["kitchen", "--from", "nowhere"], "--from 'nowhere': no assistant_dists/nowhere"),
    (["kitchen", "--skills", "transformers-lm-smollm2"], "is not a skill"),
    (["kitchen", "--llms", "cooking-prompted-skill"], "is not an LLM"),
    (["kitchen", "--skills", "no-such-skill"], "no card components/no-such-skill.yml"),
])
def test_bad_new_dist_input_is_refused_and_nothing_is_written(checkout: Path, args, message):
    before = snapshot(checkout)

    assert message in parley(checkout, "new-dist", *args, code=1)
    assert snapshot(checkout) == before


def test_add_component_puts_a_skill_and_its_llm_in_another_distribution_and_remove_skill_takes_it_from_both(checkout: Path):
    parley(checkout, "new-dist", "travel_assistant")
    before = snapshot(checkout)

    parley(checkout, "add-component", "travel-prompted-skill", "--dist", "travel_assistant")
    again = parley(checkout, "add-component", "travel-prompted-skill", "--dist", "travel_assistant")

    assert "nothing to change" in again
    assert parley(checkout, "check") == "ok: the bundle is consistent\n"
    services = compose(checkout, "assistant_dists/travel_assistant/docker-compose.override.yml")["services"]
    assert list(services) == ["agent", "travel-prompted-skill", "transformers-lm-smollm2"]
    parley(checkout, "remove-skill", "travel-prompted-skill")
    assert "travel-prompted-skill" not in read(checkout, f"assistant_dists/{MULTI}/docker-compose.override.yml")
    assert "travel_prompted_skill" not in read(checkout, "assistant_dists/travel_assistant/pipeline_conf.json")
    assert "travel-prompted-skill" not in read(checkout, "components.tsv")
    assert before != snapshot(checkout)


def test_add_component_refuses_the_agent_and_an_unknown_card(checkout: Path):
    assert "is in every distribution already" in parley(checkout, "add-component", "agent", "--dist", DIST, code=1)
    assert "no card components/nope.yml" in parley(checkout, "add-component", "nope", "--dist", DIST, code=1)


# --- what `parley check` verifies ----------------------------------------------------------------


def edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))


def test_check_catches_a_pipeline_connector_timeout_that_is_not_its_cards(checkout: Path):
    edit(checkout, f"assistant_dists/{DIST}/pipeline_conf.json", '"timeout": 60.0', '"timeout": 5.0')

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (f"assistant_dists/{DIST}/pipeline_conf.json: services.skills.prompted_skill.connector.timeout: 5.0, "
            "but components/prompted-skill.yml says 60.0") in output


def test_the_cards_timeout_is_what_the_pipeline_gets(checkout: Path):
    edit(checkout, "components/prompted-skill.yml", "timeout: 60.0", "timeout: 90.0")

    parley(checkout, "generate")

    entry = pipeline(checkout, DIST)["services"]["skills"]["prompted_skill"]
    assert entry["connector"]["timeout"] == 90.0
    assert compose(checkout, OVERRIDE)["services"]["prompted-skill"]["environment"]["GENERATIVE_TIMEOUT"] == 85


def test_check_catches_a_healthcheck_that_probes_another_port(checkout: Path):
    edit(checkout, "docker-compose.yml", "127.0.0.1:4242/health", "127.0.0.1:4243/health")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "docker-compose.yml: services.agent.healthcheck.test: probes port 4243, but components/agent.yml says 4242" in output


def test_check_catches_a_published_port_that_is_not_the_cards(checkout: Path):
    edit(checkout, f"assistant_dists/{MULTI}/dev.yml", '"127.0.0.1:8149:8149"', '"127.0.0.1:9149:8149"')

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"assistant_dists/{MULTI}/dev.yml: services.cooking-prompted-skill.ports.0: publishes port 9149, but components/cooking-prompted-skill.yml says 8149" in output


def test_check_catches_goals_that_the_prompt_file_no_longer_says(checkout: Path):
    edit(checkout, "common/prompts/cooking.json", "Helps with cooking", "Helps with baking")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"assistant_dists/{MULTI}/pipeline_conf.json: line " in output and "run `parley generate`" in output


def test_check_catches_a_skill_whose_llm_or_prompt_file_is_gone(checkout: Path):
    edit(checkout, "components/cooking-prompted-skill.yml", "llm: transformers-lm-smollm2", "llm: transformers-lm-gone")
    (checkout / "common/prompts/travel.json").unlink()

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/cooking-prompted-skill.yml: skill.llm: 'transformers-lm-gone' is not an LLM card" in output
    assert "components/travel-prompted-skill.yml: skill.prompt_file: common/prompts/travel.json does not exist" in output


def test_every_shipped_pipeline_is_one_the_agent_runs():
    from services.agent.pipeline import load_pipeline

    for dist in Repo(REPO_ROOT).distributions():
        loaded = load_pipeline(REPO_ROOT / "assistant_dists" / dist / "pipeline_conf.json")
        skills = [service for service in loaded.services if service.group == "skills"]
        assert skills and all(service.goals for service in skills), dist
