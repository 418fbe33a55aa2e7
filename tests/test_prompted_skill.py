"""The prompted skill: prompt and LLM choice, the LLM_ENDPOINTS allowlist, key routing, failures.

The LLMs here are recording HTTP servers of ours on loopback: these tests are about which URL the
skill contacts and what it sends. The real embedded model answers in tests/test_dialog_*.py.
"""

from __future__ import annotations

import json

import pytest

from skills.prompted_skill.app import create_app
from skills.prompted_skill.service import confidence_of, dialog_context
from skills.prompted_skill.protocol import Dialog
from skills.prompted_skill.settings import Settings, SettingsError
from support.errors import assert_dream_error
from support.recording_server import Reply, recording_server

SECRET = "sk-test-secret-0123456789"


def answering(*texts: str):
    return lambda request: Reply(200, [list(texts)])


def make_client(**env: str):
    settings = Settings.from_env(env)
    return create_app(settings).test_client()


def turn(text: str = "What is the capital of France?", **attributes) -> dict:
    utterance = {"text": text, "attributes": attributes}
    return {"dialogs": [{"utterances": [utterance], "human_utterances": [utterance], "bot_utterances": []}]}


# --- scoring and context ---------------------------------------------------------------------------

def test_a_complete_sentence_gets_confidence_0_9_and_a_cut_off_one_less():
    assert confidence_of("Paris is the capital of France.") == 0.9
    assert confidence_of('He said "yes!"') == 0.9
    assert confidence_of("Paris is the capital of") < 0.9


def test_context_keeps_the_last_n_utterances():
    texts = ["u1", "b1", "u2", "b2", "u3"]
    dialog = Dialog.model_validate({"utterances": [{"text": t} for t in texts], "human_utterances": [{"text": "u3"}]})
    assert dialog_context(dialog, "P", "P", 3) == ["u2", "b2", "u3"]


def test_context_starts_after_the_last_turn_with_another_prompt():
    utterances = [
        {"text": "u1", "attributes": {"prompt": "old"}}, {"text": "b1"},
        {"text": "u2", "attributes": {"prompt": "new"}}, {"text": "b2"},
        {"text": "u3", "attributes": {"prompt": "new"}},
    ]
    dialog = Dialog.model_validate({"utterances": utterances, "human_utterances": [utterances[-1]]})
    assert dialog_context(dialog, "new", "default", 10) == ["u2", "b2", "u3"]


# --- settings --------------------------------------------------------------------------------------

def test_llm_endpoints_that_are_not_a_json_object_are_a_clear_settings_error():
    with pytest.raises(SettingsError, match="LLM_ENDPOINTS"):
        Settings.from_env({"LLM_ENDPOINTS": "[1, 2]"})


def test_prompt_file_in_dreams_json_format_is_read():
    settings = Settings.from_env({"PROMPT_FILE": "common/prompts/universal_prompted_assistant.json"})
    assert "assistant" in settings.prompt


# --- answering through an LLM ----------------------------------------------------------------------

def test_hypotheses_come_back_in_dreams_skill_format_with_confidences():
    with recording_server(answering("Paris is the capital of France.", "Paris, the")) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"), PROMPT="Be brief.")
        response = client.post("/respond", json=turn())
    assert response.status_code == 200
    [[texts, confidences, human_attrs, bot_attrs, attrs]] = response.get_json()
    assert texts == ["Paris is the capital of France.", "Paris, the"]
    assert confidences[0] == 0.9 and confidences[1] < 0.9
    assert attrs[0]["lm_service_url"] == llm.url("/respond")
    sent = llm.requests[0].json()
    assert sent["dialog_contexts"] == [["What is the capital of France?"]]
    assert sent["prompts"] == ["Be brief."]


def test_the_endpoints_generative_config_is_sent_as_its_file_writes_it_and_nothing_more(tmp_path):
    greedy = tmp_path / "greedy.json"
    greedy.write_text(json.dumps({"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 24}))
    with recording_server(answering("Paris.")) as llm:
        client = make_client(
            GENERATIVE_SERVICE_URL=llm.url("/respond"),
            LLM_ENDPOINTS=json.dumps({llm.url("/respond"): {"key_env_vars": [], "generative_config": str(greedy)}}),
        )
        client.post("/respond", json=turn())
    # Only the keys the skill's config sets: the LLM merges them over its own default config.
    assert llm.requests[0].json()["configs"] == [{"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 24}]


def test_without_a_config_of_its_own_the_skill_sends_none_so_the_llms_default_config_applies():
    with recording_server(answering("Paris.")) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"))
        client.post("/respond", json=turn())
    assert llm.requests[0].json()["configs"] == [None]


def test_a_turns_lm_service_config_goes_over_the_endpoints_config_key_by_key(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"max_new_tokens": 24, "do_sample": False}))
    with recording_server(answering("Paris.")) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"), GENERATIVE_SERVICE_CONFIG=str(config_file))
        client.post("/respond", json=turn(lm_service_config={"max_new_tokens": 8, "timeout": 5}))
    # Dream's `timeout` is the skill's business (GENERATIVE_TIMEOUT), not a generation key.
    assert llm.requests[0].json()["configs"] == [{"max_new_tokens": 8, "do_sample": False}]


def test_a_turns_own_prompt_replaces_the_default():
    with recording_server(answering("Arr.")) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"), PROMPT="Be brief.")
        client.post("/respond", json=turn(prompt="Talk like a pirate."))
    assert llm.requests[0].json()["prompts"] == ["Talk like a pirate."]


def test_an_lm_service_url_outside_the_allowlist_is_never_contacted_and_the_reply_says_why():
    with recording_server(answering("allowed")) as allowed, recording_server(answering("stolen")) as outsider:
        client = make_client(
            GENERATIVE_SERVICE_URL=allowed.url("/respond"),
            LLM_ENDPOINTS=json.dumps({allowed.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY"]}}),
        )
        response = client.post("/respond", json=turn(lm_service_url=outsider.url("/respond"), openai_api_key=SECRET))
    assert response.status_code == 200
    [[text, confidence, _, _, attributes]] = response.get_json()
    assert (text, confidence) == ("", 0.0)
    assert attributes["no_hypothesis_reason"] == "lm_service_url_refused"
    assert outsider.url("/respond") in attributes["no_hypothesis_message"]
    assert outsider.connections == 0 and outsider.requests == []
    assert allowed.requests == []
    assert SECRET not in response.get_data(as_text=True)


def test_a_key_goes_only_to_the_endpoint_whose_entry_names_its_env_var():
    with recording_server(answering("From the keyed LLM.")) as keyed, recording_server(answering("Local.")) as local:
        client = make_client(
            GENERATIVE_SERVICE_URL=local.url("/respond"),
            LLM_ENDPOINTS=json.dumps({
                keyed.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY"]},
                local.url("/respond"): {"key_env_vars": []},
            }),
        )
        to_keyed = client.post("/respond", json=turn(lm_service_url=keyed.url("/respond"), api_keys={"openai_api_key": SECRET}))
        to_local = client.post("/respond", json=turn(lm_service_url=local.url("/respond"), openai_api_key=SECRET))
    assert keyed.requests[0].json()["openai_api_keys"] == [SECRET]
    assert SECRET.encode() not in local.requests[0].body
    for response in (to_keyed, to_local):
        assert response.status_code == 200
        assert SECRET not in response.get_data(as_text=True)


def test_the_skills_own_key_is_sent_when_the_turn_brings_none(monkeypatch):
    with recording_server(answering("Hi.")) as keyed:
        client = make_client(
            GENERATIVE_SERVICE_URL=keyed.url("/respond"),
            LLM_ENDPOINTS=json.dumps({keyed.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY"]}}),
            OPENAI_API_KEY="sk-from-the-environment",
        )
        client.post("/respond", json=turn())
    assert keyed.requests[0].json()["openai_api_keys"] == ["sk-from-the-environment"]


def test_with_envvars_to_send_only_those_of_the_skills_own_keys_are_sent():
    with recording_server(answering("Hi.")) as keyed:
        client = make_client(
            GENERATIVE_SERVICE_URL=keyed.url("/respond"),
            LLM_ENDPOINTS=json.dumps({keyed.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY", "OPENAI_ORGANIZATION_KEY"]}}),
            ENVVARS_TO_SEND="OPENAI_API_KEY",
            OPENAI_API_KEY="sk-from-the-environment",
            OPENAI_ORGANIZATION_KEY="org-kept-at-home",
        )
        client.post("/respond", json=turn())
    sent = keyed.requests[0].json()
    assert sent["openai_api_keys"] == ["sk-from-the-environment"]
    assert "openai_organization_keys" not in sent


def test_an_llm_that_times_out_gives_no_hypothesis_not_an_error():
    with recording_server(lambda request: Reply(200, [["late"]], delay_seconds=3)) as slow:
        client = make_client(GENERATIVE_SERVICE_URL=slow.url("/respond"), GENERATIVE_TIMEOUT="0.5")
        response = client.post("/respond", json=turn())
    assert response.status_code == 200
    [[text, confidence, _, _, attributes]] = response.get_json()
    assert text == "" and attributes["no_hypothesis_reason"] == "lm_error"
    assert "did not answer within 0.5s" in attributes["no_hypothesis_message"]


def test_an_llm_that_fails_gives_no_hypothesis_not_an_error():
    failing = lambda request: Reply(500, {"error": {"message": "out of memory", "field": None}})  # noqa: E731
    with recording_server(failing) as broken:
        client = make_client(GENERATIVE_SERVICE_URL=broken.url("/respond"))
        response = client.post("/respond", json=turn())
    assert response.status_code == 200
    [[text, _, _, _, attributes]] = response.get_json()
    assert text == "" and "out of memory" in attributes["no_hypothesis_message"]


def test_an_unreachable_llm_gives_no_hypothesis_not_an_error():
    with recording_server() as gone:
        url = gone.url("/respond")
    client = make_client(GENERATIVE_SERVICE_URL=url)
    response = client.post("/respond", json=turn())
    assert response.status_code == 200
    assert response.get_json()[0][4]["no_hypothesis_reason"] == "lm_error"


def test_an_llm_replica_killed_mid_request_is_retried_on_a_new_connection_and_the_turn_answered():
    # The first two requests find their connection dropped, as when the replica holding a pooled
    # connection dies; the third, on a connection of its own, is answered.
    def drop_twice(request):
        return Reply(200, [["Paris."]], drop_connection=len(llm.requests) <= 2)

    with recording_server(drop_twice) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"))
        response = client.post("/respond", json=turn())
    [[texts, _, _, _, _]] = response.get_json()
    assert texts == ["Paris."]
    assert len(llm.requests) == 3 and llm.connections == 3


def test_an_llm_that_keeps_dropping_the_connection_gives_no_hypothesis_after_three_tries():
    with recording_server(lambda request: Reply(drop_connection=True)) as dropping:
        client = make_client(GENERATIVE_SERVICE_URL=dropping.url("/respond"))
        response = client.post("/respond", json=turn())
    attributes = response.get_json()[0][4]
    assert attributes["no_hypothesis_reason"] == "lm_error"
    assert "could not be reached" in attributes["no_hypothesis_message"]
    assert len(dropping.requests) == 3


def test_an_llm_replica_that_answers_503_while_it_stops_is_retried_on_a_new_connection_and_the_turn_answered():
    # A replica being scaled down refuses new work with 503; the retry, on a connection of its own
    # (in a swarm: a fresh DNS lookup, another replica), is answered.
    draining = {"error": {"message": "this replica is stopping and takes no new requests", "field": None}}

    def refuse_once(request):
        return Reply(503, draining) if len(llm.requests) == 1 else Reply(200, [["Paris."]])

    with recording_server(refuse_once) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"))
        response = client.post("/respond", json=turn())
    [[texts, _, _, _, _]] = response.get_json()
    assert texts == ["Paris."]
    assert len(llm.requests) == 2 and llm.connections == 2


def test_an_llm_that_keeps_answering_503_gives_no_hypothesis_naming_its_message_after_three_tries():
    refusing = lambda request: Reply(503, {"error": {"message": "the model is still loading", "field": None}})  # noqa: E731
    with recording_server(refusing) as loading:
        client = make_client(GENERATIVE_SERVICE_URL=loading.url("/respond"))
        response = client.post("/respond", json=turn())
    attributes = response.get_json()[0][4]
    assert attributes["no_hypothesis_reason"] == "lm_error"
    assert "answered 503: the model is still loading" in attributes["no_hypothesis_message"]
    assert len(loading.requests) == 3


def test_a_bad_lm_service_config_in_a_turn_gives_no_hypothesis_with_the_field_named():
    with recording_server(answering("x.")) as llm:
        client = make_client(GENERATIVE_SERVICE_URL=llm.url("/respond"))
        response = client.post("/respond", json=turn(lm_service_config={"temperature": "hot"}))
    assert llm.requests == []
    assert "lm_service_config.temperature" in response.get_json()[0][4]["no_hypothesis_message"]


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"not json", b"[" * 100_000], ids=["text", "nested past the parser's limit"])
def test_a_body_that_is_not_json_is_a_400(body):
    response = make_client().post("/respond", data=body, content_type="application/json")
    assert_dream_error(response, 400, None)


def test_a_batch_without_dialogs_is_a_400_naming_the_field():
    assert_dream_error(make_client().post("/respond", json={}), 400, "dialogs")


def test_a_dialog_without_human_utterances_is_a_400_naming_the_field():
    response = make_client().post("/respond", json={"dialogs": [{"utterances": []}]})
    assert_dream_error(response, 400, "dialogs[0].human_utterances")


def test_a_body_over_the_size_limit_is_a_413():
    client = make_client(MAX_REQUEST_BYTES="2048")
    assert_dream_error(client.post("/respond", json=turn("x" * 5000)), 413)


def test_health_and_ping_answer():
    client = make_client()
    assert client.get("/health").status_code == 200
    assert client.get("/ping").get_json() == "pong"
