"""Skill selection among prompted skills (services/agent/skill_selection.py): plain functions, no server.

The goals are those the shipped multiskill_assistant's prompt files hold; the turns are phrased as
users phrase them, not copied from the goals. The same routing through real processes (parley up,
the embedded model) is tests/test_multiskill_parley_up.py.
"""

from __future__ import annotations

import json

import pytest
from support.servers import REPO_ROOT

from services.agent.connectors import all_skills_selector, description_based_skill_selector
from services.agent.skill_selection import rank, select_skills, terms

SKILLS = ["fairytales_prompted_skill", "cooking_prompted_skill", "travel_prompted_skill"]
GOALS = {
    name: json.loads((REPO_ROOT / "common" / "prompts" / f"{name.split('_')[0]}.json").read_text())["goals"]
    for name in SKILLS
}
# Held out from the end-to-end test's turns: other phrasings of the three topics.
TURNS = {
    "fairytales_prompted_skill": [
        "Can you make up a bedtime story for my son about a pirate ship?",
        "Please, a fairy tale where a fox outsmarts a wolf.",
        "My kid loves dinosaurs. Any story with a dinosaur in it?",
        "Write a magical tale about a talking cat.",
        "Once upon a time there was a lonely dragon... go on, what happened next?",
    ],
    "cooking_prompted_skill": [
        "How do I bake banana bread?",
        "What's a quick vegetarian lunch I can prepare?",
        "Any ideas for breakfast without eggs?",
        "How do I grill salmon without it sticking?",
        "What should I cook with leftover potatoes?",
    ],
    "travel_prompted_skill": [
        "We want to spend our summer vacation in Italy, where should we go?",
        "Is it better to take the train from Paris to London?",
        "What are the must-see sights in Barcelona?",
        "Planning a trip to Norway in winter, any advice?",
        "Which cities in Portugal are worth visiting?",
    ],
}


def dialog(*texts: str, **attributes) -> dict:
    """A dialog of `texts` whose last utterance is the user's (they alternate back from it), with its attributes."""
    utterances = [{"text": text, "attributes": {}, "user": {"user_type": "human" if (len(texts) - i) % 2 else "bot"}}
                  for i, text in enumerate(texts)]
    utterances[-1]["attributes"] = attributes
    return {"utterances": utterances, "human_utterances": [u for u in utterances if u["user"]["user_type"] == "human"]}


@pytest.mark.parametrize("expected, text", [(skill, text) for skill, texts in TURNS.items() for text in texts])
def test_a_turn_goes_to_the_skill_whose_goals_fit_it(expected: str, text: str):
    selection = select_skills(dialog(text), SKILLS, GOALS)

    assert selection.skills == [expected], selection.ranking
    assert selection.reasons[expected].startswith("its goals ranked 1 of 3 for the turn")


def test_nothing_that_matches_a_skills_goals_asks_every_prompted_skill():
    selection = select_skills(dialog("Hello there!"), SKILLS, GOALS)

    assert selection.skills == SKILLS
    assert "nothing in the turn matched" in selection.reason
    assert all(item.score == 0 for item in selection.ranking)


def test_a_short_turn_is_ranked_with_the_two_utterances_before_it():
    selection = select_skills(dialog("Tell me about pancakes", "Mix flour, eggs and milk, then fry them.", "And then?"), SKILLS, GOALS)

    assert selection.skills == ["cooking_prompted_skill"]


@pytest.mark.parametrize("asked, expected", [
    ("travel_prompted_skill", ["travel_prompted_skill"]),
    (["cooking_prompted_skill", "travel_prompted_skill"], ["cooking_prompted_skill", "travel_prompted_skill"]),
    (["travel_prompted_skill", "no_such_skill"], ["travel_prompted_skill"]),
])
def test_the_turns_selected_skills_override_the_ranking(asked, expected):
    selection = select_skills(dialog("How do I bake banana bread?", selected_skills=asked), SKILLS, GOALS)

    assert selection.skills == expected
    assert selection.reasons == {name: "the turn's selected_skills asked for it" for name in expected}


@pytest.mark.parametrize("asked", ["all", []])
def test_selected_skills_all_or_empty_asks_every_skill(asked):
    selection = select_skills(dialog("How do I bake banana bread?", selected_skills=asked), SKILLS, GOALS)

    assert selection.skills is None
    assert set(selection.reasons) == set(SKILLS)


def test_selected_skills_naming_no_skill_of_the_pipeline_leaves_the_ranking_to_choose():
    selection = select_skills(dialog("How do I bake banana bread?", selected_skills=["weather_skill"]), SKILLS, GOALS)

    assert selection.skills == ["cooking_prompted_skill"]


def test_a_skill_without_goals_is_always_asked():
    selection = select_skills(dialog("How do I bake banana bread?"), [*SKILLS, "dummy_skill"], GOALS)

    assert selection.skills == ["cooking_prompted_skill", "dummy_skill"]
    assert selection.reasons["dummy_skill"].startswith("not a prompted skill")


def test_skills_that_tie_for_the_last_place_are_all_asked():
    goals = {"a": "Tells stories about cats.", "b": "Tells stories about dogs.", "c": "Helps with taxes."}

    selection = select_skills(dialog("A story, please"), list(goals), goals, top_n=1)

    assert selection.skills == ["a", "b"]


def test_top_n_asks_that_many_best_skills():
    selection = select_skills(dialog("A bedtime story about a dragon and a princess who cook dinner"), SKILLS, GOALS, top_n=2)

    assert selection.skills == ["fairytales_prompted_skill", "cooking_prompted_skill"]


def test_russian_words_in_other_forms_meet_the_goals():
    goals = {"skazki": "Рассказывает сказки для детей.", "recepty": "Подсказывает рецепты блюд на обед и ужин."}

    assert rank("Расскажи сказку про кота", goals, "RU")[0].skill == "skazki"
    assert rank("Какой рецепт подойдёт для ужина?", goals, "RU")[0].skill == "recepty"
    assert terms("сказку сказки Сказка", "RU") == ["сказк"] * 3


def test_english_words_in_other_forms_are_one_term_and_stop_words_are_left_out():
    assert terms("Recipes for a recipe: cooking what I cook") == ["reci", "reci", "cook", "cook"]


def test_the_connectors_return_the_selection_with_its_reasons():
    options = {"skill_names": SKILLS, "skill_goals": GOALS, "top_n": 1}

    ranked = description_based_skill_selector(dialog("How do I bake banana bread?"), options)
    every = all_skills_selector(dialog("How do I bake banana bread?"), {"skill_names": SKILLS})
    chosen = all_skills_selector(dialog("Hi", selected_skills="travel_prompted_skill"), {"skill_names": SKILLS})

    assert ranked.skills == ["cooking_prompted_skill"] and ranked.annotation()["ranking"][0]["skill"] == "cooking_prompted_skill"
    assert every.skills is None and every.annotation() is None
    assert chosen.skills == ["travel_prompted_skill"]
