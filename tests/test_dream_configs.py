"""Dream's generative configs and sending variables, as Dream's skills send them, on the LLM service.

Dream ships its generative configs as files (common/generative_configs/*.json) that its skills send
unchanged in `configs`, and its skills spread their "sending variables" (the user's OpenAI keys and
organizations) at the top level of a `/respond` body. Each config below has the keys and values of
the Dream file it is named after, and the body is shaped as Dream's own transformers_lm test sends
it (two dialogs, a prompt each, a config each). Every one gets a 200 with one list of answers per
dialog, on both backends.

Tier: a real LLM service (gunicorn on loopback) on the real embedded SmolLM2, one per backend.
"""

from __future__ import annotations

import importlib.util

import pytest
import requests
from support.servers import service_server

from common.model_sources import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model

# Dream's files, key for key.
DREAM_CONFIGS = {
    "default_generative_config.json": {
        "max_new_tokens": 120, "min_new_tokens": 8, "top_p": 0.9, "temperature": 0.9, "do_sample": True, "num_return_sequences": 2,
    },
    "rugpt35_config.json": {"max_new_tokens": 200, "min_new_tokens": 8, "num_beams": 2, "do_sample": True, "num_return_sequences": 2},
    "ruxglm_config.json": {
        "max_new_tokens": 2048, "min_new_tokens": 8, "do_sample": True, "num_return_sequences": 2,
        "repetition_penalty": 1.1, "eos_token_id": [400], "replacement": [["\n", "</s>"]],
    },
    # What Dream's services/transformers_lm/test.py sends: transformers' older length keys.
    "transformers_lm test's DEFAULT_CONFIG": {
        "max_length": 60, "min_length": 8, "top_p": 0.9, "temperature": 0.9, "do_sample": True, "num_return_sequences": 2,
    },
}
DIALOGS = [
    ["Hi! I am Marcus. How are you today?", "Hi Marcus! I am fine. How are you?", "I am great. What are your plans for today?"],
    ["Hi Marcus! I am fine. How are you?", "I am great. What are your plans for today?"],
]
PROMPT = "Respond like a friendly chatbot."
# Dream's sending variables, as a skill spreads them at the top level of the body.
SENDING_VARIABLES = {"openai_api_keys": ["sk-not-used-by-a-local-model-0123"], "openai_organizations": ["org-not-used"]}


@pytest.fixture(scope="module", params=["llama_cpp", "transformers"])
def lm_url(request):
    if request.param == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make install installs it)")
    env = {"BACKEND": request.param, "PRETRAINED_MODEL_NAME_OR_PATH": DEFAULT_MODEL_NAME, "MAX_BATCH_SIZE": "8"}
    with service_server("transformers_lm", env, startup_timeout_seconds=400) as server:
        yield server.base_url


def respond(lm_url: str, config: dict, **extra) -> list:
    body = {"dialog_contexts": DIALOGS, "prompts": [PROMPT] * len(DIALOGS), "configs": [config] * len(DIALOGS), **extra}
    response = requests.post(lm_url + "/respond", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("dream_file", DREAM_CONFIGS)
def test_a_config_dream_ships_is_answered_as_it_is(lm_url, dream_file):
    config = DREAM_CONFIGS[dream_file]

    answers = respond(lm_url, config)

    assert len(answers) == len(DIALOGS)
    assert all(len(hypotheses) == config["num_return_sequences"] for hypotheses in answers)
    assert all(isinstance(text, str) for hypotheses in answers for text in hypotheses)
    assert any(text.strip() for hypotheses in answers for text in hypotheses)
    # Dream's replacement pairs: each stand-in the model writes comes back as its text.
    assert not any(stand_in in text for _, stand_in in config.get("replacement", []) for hypotheses in answers for text in hypotheses)


def test_the_replacement_pairs_rewrite_the_prompt_as_dream_does(lm_url):
    # Dream's ("\n", "</s>") pair: the model reads each newline of the prompt as "</s> " (and each
    # "</s>" it writes comes back as a newline: the test above).
    body = {"dialog_contexts": DIALOGS[:1], "prompts": [PROMPT], "configs": [DREAM_CONFIGS["ruxglm_config.json"]]}
    response = requests.post(lm_url + "/render", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rendered = response.json()["rendered"][0]["prompt"]

    assert "\n" not in rendered and "</s> " in rendered


def test_dreams_sending_variables_at_the_top_level_are_accepted(lm_url):
    answers = respond(lm_url, DREAM_CONFIGS["default_generative_config.json"], **SENDING_VARIABLES)

    assert [len(hypotheses) for hypotheses in answers] == [2, 2]
