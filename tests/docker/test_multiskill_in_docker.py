"""multiskill_assistant in real Docker: three prompted skills from one image, one LLM, the agent
routing each turn to the skill whose goals fit it.

Its images build (the skills share the prompted skill's image layers, the LLM and the agent are the
universal distribution's), `docker compose up -d --wait` (base, override, cpu overlay, and an
overlay of the test's own that publishes the agent on a free port) starts all five containers, and
one topic turn per skill, sent with the checkout's key, is answered by that skill: the routing is
printed (`routing: N/3`). Run by `make test-docker` after the universal distribution's test, on
its engine; the stack is always taken down with `down -v`, and the test fails if anything of it is
left.
"""

from __future__ import annotations

import json
import subprocess
from typing import Iterator

import pytest
import requests
from support.servers import free_port
from support.topics import TOPIC_TURNS

from test_distribution_in_docker import OUTPUT_DIR, REPO_ROOT, api_key, engine, project_leftovers, run, step  # noqa: F401

DIST = "multiskill_assistant"
PROJECT = "parley-test-multiskill"
PORTS_OVERLAY = OUTPUT_DIR / "docker-multiskill-ports.yml"
# The first turn of each topic: one per skill.
ONE_TURN_PER_SKILL = [next(turn for turn in TOPIC_TURNS if turn[0] == skill) for skill in dict(TOPIC_TURNS)]


def compose(*extra_files: str) -> list[str]:
    files = ["docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml", f"assistant_dists/{DIST}/cpu.yml", *extra_files]
    return ["docker", "compose", "--project-name", PROJECT, *(arg for file in files for arg in ("-f", file))]


@pytest.fixture(scope="module")
def agent(engine: dict[str, str]) -> Iterator[str]:
    """The distribution built and up; the agent's URL. Always taken down."""
    port = free_port()
    PORTS_OVERLAY.parent.mkdir(parents=True, exist_ok=True)
    PORTS_OVERLAY.write_text(json.dumps({"services": {"agent": {"ports": [f"127.0.0.1:{port}:4242"]}}}))
    command = compose(str(PORTS_OVERLAY))
    try:
        with step(f"build the {DIST} images (base + override + cpu.yml)"):
            run([*command, "--progress", "plain", "build"], engine, "docker-multiskill-build.log")
        with step(f"docker compose up -d --wait ({DIST}: agent, LLM, three skills)"):
            run([*command, "up", "-d", "--wait", "--wait-timeout", "300"], engine, "docker-multiskill-up.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        with step(f"docker compose down -v ({DIST})"):
            with open(OUTPUT_DIR / "docker-multiskill-services.log", "w") as log:
                subprocess.run([*command, "logs", "--no-color"], cwd=REPO_ROOT, env=engine, stdout=log, stderr=subprocess.STDOUT)
            subprocess.run([*command, "down", "-v", "--remove-orphans"], cwd=REPO_ROOT, env=engine, check=False)
            PORTS_OVERLAY.unlink(missing_ok=True)
            leftovers = project_leftovers(engine, PROJECT)
            print(f"    left of {PROJECT}: {leftovers or 'nothing'}")
    assert leftovers == [], "docker compose down -v left these behind"


def test_each_topic_turn_is_answered_by_the_skill_of_its_topic_in_the_containers(agent: str, api_key: str):
    routed = []
    for number, (intended, text) in enumerate(ONE_TURN_PER_SKILL):
        with step(f"turn {number + 1}: {text!r}"):
            response = requests.post(agent + "/", json={"user_id": f"docker-multiskill-{number}", "payload": text},
                                     headers={"Authorization": f"Bearer {api_key}"}, timeout=180)
            assert response.status_code == 200, response.text
            answer = response.json()
            print(f"    {answer['active_skill']}: {answer['response'][:80]!r}")
        routed.append((intended, answer["active_skill"], answer["response"]))
    hits = sum(intended == answered for intended, answered, _ in routed)
    print(f"\n    routing: {hits}/{len(routed)} topic turns answered by the intended skill")

    assert hits == len(routed), routed
    assert all(response.strip() for _, _, response in routed)
