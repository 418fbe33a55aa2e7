"""A distribution made by the commands runs at once: `parley add-llm` (the tiny model the tests
build), `parley add-skill` (a Dream prompt file), `parley new-dist`, then `parley up` of the new
distribution — real gunicorn processes on free ports — answers a turn with the new skill. Then
`parley remove-skill` and `parley check` leave the bundle consistent.

The checkout is a copy of the repository's bundle; the tiny model answers in milliseconds (its text
is noise: what is tested is the wiring).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from parley.cli import cli
from parley.repo import Repo
from parley.up import run_distribution
from support.servers import REPO_ROOT

BUNDLE = [".env", "docker-compose.yml", "components.tsv", "MODELS.md", "components", "assistant_dists", "common", "services", "skills"]


def parley(root: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--repo", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The checkout after the commands; the new distribution running on it."""
    from support.tiny_model import tiny_model_dir

    workdir = tmp_path_factory.mktemp("new-dist")
    root = workdir / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in BUNDLE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    prompt = workdir / "astronomy.json"
    prompt.write_text(json.dumps({"prompt": "You answer questions about the night sky.", "goals": "Answers questions about stars and planets."}))
    config = workdir / "short.json"
    config.write_text(json.dumps({"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}))

    parley(root, "add-llm", "transformers-lm-tiny", "--model", str(tiny_model_dir()), "--dist", "universal_prompted_assistant")
    parley(root, "add-skill", "astronomy-prompted-skill", "--prompt-file", str(prompt), "--llm", "transformers-lm-tiny",
           "--config", str(config), "--dist", "universal_prompted_assistant")
    parley(root, "new-dist", "astronomy_assistant", "--skills", "astronomy-prompted-skill")
    dist = root / "assistant_dists" / "astronomy_assistant"
    # One torch thread: on a busy 2-core machine more threads spin against each other.
    (dist / "test.yml").write_text(json.dumps({"services": {"transformers-lm-tiny": {"environment": {"OMP_NUM_THREADS": "1", "BACKEND": "transformers"}}}}))
    with run_distribution(Repo(root), "astronomy_assistant", free_ports=True, overlays=["cpu.yml", "test.yml"],
                          state_dir=workdir / "state", startup_timeout=300) as running:
        yield root, running


def test_the_new_distribution_runs_only_its_own_components(made):
    _, running = made

    assert sorted(running.services) == ["agent", "astronomy-prompted-skill", "transformers-lm-tiny"]


def test_a_turn_through_the_new_distribution_is_answered_by_the_added_skill(made):
    _, running = made

    answer = requests.post(running.url("agent") + "/", json={"user_id": "stargazer", "payload": "Which planet has rings?"}, timeout=120).json()

    assert answer["active_skill"] == "astronomy_prompted_skill", answer
    assert answer["response"].strip()
    assert answer["debug_output"][0]["selected_because"].startswith("its goals ranked 1 of 1")


def test_the_skill_runs_the_prompt_it_was_given(made):
    _, running = made

    health = requests.get(running.url("astronomy-prompted-skill") + "/health", timeout=10).json()

    assert health["service"] == "astronomy_prompted_skill"
    assert health["llm_endpoints"] == [f"{running.url('transformers-lm-tiny')}/respond"]


def test_removing_the_skill_and_its_llm_leaves_check_green(made):
    root, _ = made

    parley(root, "remove-skill", "astronomy-prompted-skill")
    parley(root, "remove-llm", "transformers-lm-tiny")

    assert "ok: the bundle is consistent" in CliRunner().invoke(cli, ["check", "--no-tools", "--repo", str(root)]).output
    assert not (root / "common/prompts/astronomy-prompted-skill.json").exists()
