"""A Russian turn through `parley up`: universal_ru_prompted_assistant (LANGUAGE=RU, a Russian prompt
file, the same embedded SmolLM2 card) on free ports, from its own compose files
(tests/support/scratch_dist.py gives the real model roomy timeouts and short answers)."""

from __future__ import annotations

import re
import uuid

import pytest
import requests

from parley.repo import Repo
from parley.up import run_distribution
from support.scratch_dist import TURN_TIMEOUT, write_scratch_checkout

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def russian(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("universal-ru")
    checkout = write_scratch_checkout(workdir / "checkout", "universal_ru_prompted_assistant")
    with run_distribution(Repo(checkout), "universal_ru_prompted_assistant", free_ports=True, overlays=["cpu.yml", "test.yml"],
                          state_dir=workdir / "state", startup_timeout=600) as running:
        yield running


def test_a_russian_turn_through_the_russian_distribution_is_answered_in_cyrillic(russian):
    answer = say(russian.url("agent"), f"ru-{uuid.uuid4().hex[:8]}", "Привет! Расскажи, пожалуйста, что-нибудь о Москве.")

    assert russian.services["agent"].plan.env["LANGUAGE"] == "RU"
    assert answer["active_skill"] == "universal_ru_prompted_skill"
    # The 135M model's Russian is weak; what is robust is that it answers in Russian letters.
    assert len(re.findall(r"[А-Яа-яЁё]", answer["response"])) >= 5, answer["response"]


def say(url: str, user_id: str, payload: str) -> dict:
    response = requests.post(url + "/", json={"user_id": user_id, "payload": payload}, timeout=TURN_TIMEOUT + 30)
    assert response.status_code == 200, response.text
    return response.json()
