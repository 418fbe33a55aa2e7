"""Many prompted skills through `parley up`: multiskill_assistant (fairy tales, cooking, travel, each
made by `parley add-skill`, all on the embedded SmolLM2) on free ports, from its own compose files. The Russian distribution's turn is
tests/test_russian_parley_up.py.

Each turn goes to the skill whose goals fit it (the agent's description-based skill selector). The
twelve topic turns are phrased as users phrase them, not copied from the goals; the number routed
to the intended skill is printed (`routing: N/12`) and must be 12. The distribution starts once for
the module; tests/support/scratch_dist.py gives the real model roomy timeouts and short answers.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from parley.repo import Repo
from parley.up import run_distribution
from support.scratch_dist import TURN_TIMEOUT, write_scratch_checkout
from support.topics import COOKING, FAIRY_TALES, TOPIC_TURNS, TRAVEL

pytestmark = pytest.mark.model

RUN = uuid.uuid4().hex[:8]


def say(url: str, user_id: str, payload: str, **fields) -> dict:
    response = requests.post(url + "/", json={"user_id": user_id, "payload": payload, **fields}, timeout=TURN_TIMEOUT + 30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def multiskill(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multiskill")
    checkout = write_scratch_checkout(workdir / "checkout", "multiskill_assistant")
    with run_distribution(Repo(checkout), "multiskill_assistant", free_ports=True, overlays=["cpu.yml", "test.yml"],
                          state_dir=workdir / "state", startup_timeout=600) as running:
        yield running


@pytest.fixture(scope="module")
def topic_answers(multiskill):
    """The twelve topic turns, each the first of its own user's dialog, four at a time."""
    agent = multiskill.url("agent")
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda numbered: say(agent, f"topic-{numbered[0]}-{RUN}", numbered[1][1]), enumerate(TOPIC_TURNS)))
    return list(zip(TOPIC_TURNS, answers, strict=True))


def test_twelve_topic_turns_are_answered_by_the_skill_of_their_topic(topic_answers):
    routed = [(intended, answer["active_skill"], text) for (intended, text), answer in topic_answers]
    hits = sum(intended == answered for intended, answered, _ in routed)
    print(f"\nrouting: {hits}/{len(routed)} topic turns answered by the intended skill")

    assert hits == len(routed), [item for item in routed if item[0] != item[1]]
    assert {answered for _, answered, _ in routed} == {FAIRY_TALES, COOKING, TRAVEL}
    assert all(answer["response"].strip() for _, answer in topic_answers)


def test_the_answer_says_why_its_skill_was_selected(multiskill, topic_answers):
    (intended, _), answer = topic_answers[6]  # "Give me an easy recipe for pancakes."
    [hypothesis] = answer["debug_output"]  # only the selected skill was asked

    assert hypothesis["skill_name"] == intended == COOKING
    assert hypothesis["selected_because"].startswith("its goals ranked 1 of 3 for the turn")
    assert "matched: reci" in hypothesis["selected_because"]
    stored = requests.get(multiskill.url("agent") + f"/api/dialogs/{answer['dialog_id']}", timeout=10).json()
    selection = stored["human_utterances"][0]["annotations"]["description_based_skill_selector"]
    assert selection["selected_skills"] == [COOKING]
    assert [item["skill"] for item in selection["ranking"]][0] == COOKING


def test_a_turns_selected_skills_overrides_the_ranking(multiskill):
    answer = say(multiskill.url("agent"), f"override-{RUN}", "Give me an easy recipe for pancakes.", selected_skills=[TRAVEL])

    assert answer["active_skill"] == TRAVEL
    assert answer["debug_output"][0]["selected_because"] == "the turn's selected_skills asked for it"


def test_a_turn_that_matches_no_goals_is_asked_of_every_prompted_skill(multiskill):
    answer = say(multiskill.url("agent"), f"hello-{RUN}", "Hello!")

    assert answer["active_skill"] in {FAIRY_TALES, COOKING, TRAVEL}
    asked = {item["skill_name"] for item in answer["debug_output"]}
    assert asked == {FAIRY_TALES, COOKING, TRAVEL}
    assert all("nothing in the turn matched" in item["selected_because"] for item in answer["debug_output"])
