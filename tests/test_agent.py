"""The agent: the pipeline run in dependency order, failures and timeouts, the state, the HTTP API.

Skills here are recording HTTP servers of ours on loopback (these tests are about the agent's own
routing); the real prompted skill and the real model answer in tests/test_dialog_*.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from services.agent.app import create_app
from services.agent.pipeline import PipelineError, load_pipeline, parse_pipeline
from services.agent.protocol import TurnRequest
from services.agent.settings import Settings
from support.errors import assert_dream_error
from support.recording_server import Reply, recording_server

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_PIPELINE = REPO_ROOT / "assistant_dists/universal_prompted_assistant/pipeline_conf.json"
SECRET = "sk-agent-test-secret-42"
LAST_CHANCE = "Sorry, something went wrong inside. Please tell me, what did you say."
TIMEOUT_TEXT = "Sorry, I need to think more on that. Let's talk about something else."


def skill_reply(text: str, confidence: float = 0.9, delay_seconds: float = 0.0):
    """A skill that answers one hypothesis in Dream's format."""
    return lambda request: Reply(200, [[[text], [confidence], [{}], [{}], [{"can_continue": "no"}]]], delay_seconds)


def write_pipeline(tmp_path: Path, skills: dict[str, tuple[str, float]]) -> Path:
    """The distribution's pipeline with its skills replaced by `name -> (url, timeout)`."""
    pipeline = json.loads(DIST_PIPELINE.read_text())
    template = pipeline["services"]["skills"]["prompted_skill"]
    pipeline["services"]["skills"] = {
        name: {**template, "connector": {"protocol": "http", "url": url, "timeout": timeout}}
        for name, (url, timeout) in skills.items()
    }
    path = tmp_path / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return path


def make_client(tmp_path: Path, skills: dict[str, tuple[str, float]], **env: str):
    settings = Settings.from_env({
        "PIPELINE_CONFIG": str(write_pipeline(tmp_path, skills)),
        "STATE_DB_PATH": str(tmp_path / "state.sqlite3"),
        **env,
    })
    return create_app(settings).test_client()


# --- the pipeline ----------------------------------------------------------------------------------

def test_the_distributions_pipeline_loads_with_its_skill_after_the_selector():
    pipeline = load_pipeline(DIST_PIPELINE)
    skill = next(s for s in pipeline.services if s.name == "skills.prompted_skill")
    assert skill.previous_services == ("skill_selectors.all_skills_selector",)
    assert pipeline.last_chance is not None and pipeline.timeout is not None


def test_an_unknown_formatter_is_an_error_naming_the_service():
    data = json.loads(DIST_PIPELINE.read_text())
    data["services"]["skills"]["prompted_skill"]["dialog_formatter"] = "state_formatters.dp_formatters:nope"
    with pytest.raises(PipelineError, match="services.skills.prompted_skill.dialog_formatter"):
        parse_pipeline(data)


def test_previous_services_that_form_a_cycle_are_an_error():
    data = json.loads(DIST_PIPELINE.read_text())
    data["services"]["skill_selectors"]["all_skills_selector"]["previous_services"] = ["response_selectors"]
    with pytest.raises(PipelineError, match="cycle"):
        parse_pipeline(data)


def test_the_answer_is_the_hypothesis_with_the_highest_confidence(tmp_path):
    with recording_server(skill_reply("Low.", 0.5)) as low, recording_server(skill_reply("High.", 0.9)) as high:
        client = make_client(tmp_path, {"low_skill": (low.url("/respond"), 30), "high_skill": (high.url("/respond"), 30)})
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert (body["response"], body["active_skill"], body["confidence"]) == ("High.", "high_skill", 0.9)
    assert {h["skill_name"] for h in body["debug_output"]} == {"low_skill", "high_skill"}
    assert set(body) >= {"dialog_id", "utt_id", "user_id", "response", "active_skill"}


def test_independent_skills_are_called_concurrently(tmp_path):
    both_called = threading.Barrier(2, timeout=5)

    def waits_for_the_other(request):
        both_called.wait()  # breaks (and the skill fails) if the agent called the skills one by one
        return skill_reply("Together.")(request)

    with recording_server(waits_for_the_other) as first, recording_server(waits_for_the_other) as second:
        client = make_client(tmp_path, {"a": (first.url("/respond"), 8), "b": (second.url("/respond"), 8)})
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert body["response"] == "Together."
    assert len(body["debug_output"]) == 2


def test_skills_get_the_dialog_in_dreams_skill_format(tmp_path):
    with recording_server(skill_reply("Hi.")) as skill:
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 30)})
        client.post("/", json={"user_id": "ann", "payload": "First"})
        client.post("/", json={"user_id": "ann", "payload": "Second", "prompt": "Be a pirate."})
    [dialog] = skill.requests[-1].json()["dialogs"]
    assert [u["text"] for u in dialog["utterances"]] == ["First", "Hi.", "Second"]
    assert [u["text"] for u in dialog["human_utterances"]] == ["First", "Second"]
    assert dialog["human_utterances"][-1]["attributes"]["prompt"] == "Be a pirate."


def test_a_skill_that_hangs_past_its_timeout_gives_the_last_chance_answer_within_the_timeout(tmp_path, caplog):
    with recording_server(skill_reply("Too late.", delay_seconds=10)) as hanging:
        client = make_client(tmp_path, {"slow": (hanging.url("/respond"), 1.0)})
        started = time.monotonic()
        response = client.post("/", json={"user_id": "ann", "payload": "Hello"})
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.get_json()["response"] == LAST_CHANCE
    assert response.get_json()["active_skill"] == "last_chance_service"
    assert elapsed < 5.0, elapsed  # the skill's 1 s timeout plus the agent's own work, not the skill's 10 s
    assert "skills.slow skipped: no answer within its timeout of 1s" in caplog.text


def test_a_failing_skill_is_skipped_and_another_answers(tmp_path, caplog):
    failing = lambda request: Reply(500, {"error": "boom"})  # noqa: E731
    with recording_server(failing) as broken, recording_server(skill_reply("Still here.")) as healthy:
        client = make_client(tmp_path, {"broken": (broken.url("/respond"), 30), "ok": (healthy.url("/respond"), 30)})
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert (body["response"], body["active_skill"]) == ("Still here.", "ok")
    assert 'skills.broken skipped: answered 500: {"error": "boom"}' in caplog.text


def test_a_skill_with_a_malformed_answer_is_skipped(tmp_path, caplog):
    with recording_server(lambda request: Reply(200, {"not": "a list"})) as odd:
        client = make_client(tmp_path, {"odd": (odd.url("/respond"), 30)})
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert body["response"] == LAST_CHANCE
    assert "skills.odd skipped: answered something other than a list with one result per dialog" in caplog.text


def test_a_skill_whose_parallel_lists_differ_in_length_is_skipped_not_cut_short(tmp_path, caplog):
    # Two texts but one confidence: zipping would silently keep one hypothesis and drop the other.
    uneven = lambda request: Reply(200, [[["One.", "Two."], [0.9], [{}, {}], [{}, {}], [{}, {}]]])  # noqa: E731
    with recording_server(uneven) as odd:
        client = make_client(tmp_path, {"odd": (odd.url("/respond"), 30)})
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert body["response"] == LAST_CHANCE and body["debug_output"] == []
    assert "skills.odd skipped: its answer could not be used (ValueError: a skill's parallel lists differ in length (2, 1, 2, 2, 2)" in caplog.text


def test_a_turn_over_the_response_time_limit_gets_the_timeout_answer(tmp_path):
    with recording_server(skill_reply("Too late.", delay_seconds=10)) as hanging:
        client = make_client(tmp_path, {"slow": (hanging.url("/respond"), 30)}, RESPONSE_TIME_LIMIT="1")
        body = client.post("/", json={"user_id": "ann", "payload": "Hello"}).get_json()
    assert (body["response"], body["active_skill"]) == (TIMEOUT_TEXT, "timeout_service")


def write_pipeline_with_annotator(tmp_path: Path, annotator_url: str, skill_url: str, required: bool) -> Path:
    """A Dream-style pipeline: a named connector, an annotator before the skill, a disabled service."""
    pipeline = json.loads(write_pipeline(tmp_path, {"s": (skill_url, 30)}).read_text())
    pipeline["connectors"] = {"spelling": {"protocol": "http", "url": annotator_url, "timeout": 30}}
    pipeline["services"]["annotators"] = {
        "spelling": {
            "connector": "spelling",
            "dialog_formatter": "state_formatters.dp_formatters:last_utt_dialog",
            "response_formatter": "state_formatters.dp_formatters:simple_formatter_service",
            "state_manager_method": "add_annotation",
        },
        "disabled": {"connector": {"protocol": "http", "url": "http://127.0.0.1:9/x"}, "is_enabled": False},
    }
    skill = pipeline["services"]["skills"]["s"]
    skill["previous_services"] = ["annotators"]
    if required:
        skill["required_previous_services"] = ["annotators.spelling"]
    path = tmp_path / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return path


def client_for(tmp_path: Path, pipeline: Path):
    settings = Settings.from_env({"PIPELINE_CONFIG": str(pipeline), "STATE_DB_PATH": str(tmp_path / "state.sqlite3")})
    return create_app(settings).test_client()


def test_an_annotators_result_is_stored_and_seen_by_the_skills_after_it(tmp_path):
    annotate = lambda request: Reply(200, [{"corrected": request.json()["sentences"][0].upper()}])  # noqa: E731
    with recording_server(annotate) as annotator, recording_server(skill_reply("Hi.")) as skill:
        pipeline = write_pipeline_with_annotator(tmp_path, annotator.url("/respond"), skill.url("/respond"), required=False)
        body = client_for(tmp_path, pipeline).post("/", json={"user_id": "ann", "payload": "hello"}).get_json()
    [dialog] = skill.requests[0].json()["dialogs"]
    assert dialog["human_utterances"][-1]["annotations"] == {"spelling": {"corrected": "HELLO"}}
    assert body["response"] == "Hi."


def test_the_reset_annotation_clears_the_users_attributes_on_a_dialogs_first_turn_but_keeps_disliked_skills(tmp_path):
    # Given a user whose attributes a skill set in an earlier dialog
    remembering = lambda request: Reply(200, [[["Noted."], [0.9], [{"mood": "sad", "disliked_skills": ["jokes"]}], [{}], [{}]]])  # noqa: E731
    annotate = lambda request: Reply(200, [{"ok": True}])  # noqa: E731
    with recording_server(annotate) as annotator, recording_server(remembering) as skill:
        pipeline = write_pipeline_with_annotator(tmp_path, annotator.url("/respond"), skill.url("/respond"), required=False)
        data = json.loads(pipeline.read_text())
        data["services"]["annotators"]["spelling"]["state_manager_method"] = \
            "add_annotation_and_reset_human_attributes_for_first_turn"
        pipeline.write_text(json.dumps(data))
        client = client_for(tmp_path, pipeline)
        client.post("/", json={"user_id": "ann", "payload": "one"})
        client.post("/", json={"user_id": "ann", "payload": "two"})
        attributes_in_the_same_dialog = skill.requests[-1].json()["dialogs"][0]["human"]["attributes"]
        # When a new dialog starts
        client.post("/", json={"user_id": "ann", "payload": "/start"})
        client.post("/", json={"user_id": "ann", "payload": "three"})
    # Then later turns of a dialog keep what was learnt, and the first turn of the next one starts afresh
    assert attributes_in_the_same_dialog == {"mood": "sad", "disliked_skills": ["jokes"]}
    assert skill.requests[-1].json()["dialogs"][0]["human"]["attributes"] == {"disliked_skills": ["jokes"]}


def test_a_service_whose_required_service_failed_is_skipped(tmp_path):
    with recording_server(lambda request: Reply(500, {})) as annotator, recording_server(skill_reply("Hi.")) as skill:
        pipeline = write_pipeline_with_annotator(tmp_path, annotator.url("/respond"), skill.url("/respond"), required=True)
        body = client_for(tmp_path, pipeline).post("/", json={"user_id": "ann", "payload": "hello"}).get_json()
    assert skill.requests == []
    assert body["response"] == LAST_CHANCE


# --- keys ------------------------------------------------------------------------------------------

def test_keys_reach_the_skills_for_this_turn_but_are_never_stored_or_answered(tmp_path):
    def echoing(request):  # a careless skill that repeats whatever keys it was given
        keys = json.dumps(request.json()["dialogs"][0]["human_utterances"][-1]["attributes"].get("api_keys"))
        return Reply(200, [[f"Your keys: {keys}.", 0.9, {"keys": keys}, {}, {}]])

    with recording_server(echoing) as skill:
        client = make_client(tmp_path, {"echo": (skill.url("/respond"), 30)})
        first = client.post("/", json={"user_id": "ann", "payload": "Hi", "OPENAI_API_KEY": SECRET})
        client.post("/", json={"user_id": "ann", "payload": "Again"})
    sent_first, sent_second = (r.json()["dialogs"][0] for r in skill.requests)
    assert sent_first["human_utterances"][-1]["attributes"]["api_keys"] == {"openai_api_key": SECRET}
    assert SECRET not in json.dumps(sent_second)  # for that turn only
    assert SECRET not in first.get_data(as_text=True)
    stored = client.get(f"/api/dialogs/{first.get_json()['dialog_id']}").get_data(as_text=True)
    assert SECRET not in stored
    assert SECRET.encode() not in _all_bytes_of(tmp_path)


@pytest.mark.parametrize("field", ["OPENAI_API_KEY", "openai_organization", "GIGACHAT_CREDENTIAL", "password", "token", "apikey"])
def test_fields_named_like_credentials_are_keys_not_attributes(field):
    attributes, keys, secrets = TurnRequest(user_id="ann", payload="Hi", **{field: SECRET}, mood="curious").split_attributes()
    assert keys == {field.lower(): SECRET}
    assert secrets == [SECRET]
    assert attributes == {"mood": "curious"}


@pytest.mark.parametrize("fields", [
    {"lm_service_kwargs": {"openai_api_key": SECRET, "stop": ["\n"]}},  # Dream's universal skill reads it
    {"attributes": {"deep": [{"OPENAI_API_KEY": SECRET, "keep": 1}]}},
    {"lm_service_kwargs": {"openai_api_keys": [SECRET]}},  # Dream's sending variables: a list, plural
])
def test_a_key_nested_anywhere_in_a_turn_is_a_key_and_the_rest_stays(fields):
    attributes, keys, secrets = TurnRequest(user_id="ann", payload="Hi", **fields).split_attributes()
    assert keys == {"openai_api_key": SECRET}
    assert secrets == [SECRET]
    assert SECRET not in json.dumps(attributes)
    assert attributes.get("lm_service_kwargs", {}).get("stop", ["\n"]) == ["\n"]
    assert attributes.get("attributes", {"deep": [{"keep": 1}]}) == {"deep": [{"keep": 1}]}


def test_a_top_level_key_wins_over_one_nested_in_the_same_turn():
    _, keys, secrets = TurnRequest(user_id="ann", payload="Hi", lm_service_kwargs={"openai_api_key": "nested-key-value"},
                                   OPENAI_API_KEY=SECRET).split_attributes()
    assert keys == {"openai_api_key": SECRET}
    assert sorted(secrets) == sorted(["nested-key-value", SECRET])


def test_counts_in_a_config_are_not_mistaken_for_keys():
    attributes, keys, _ = TurnRequest(user_id="ann", payload="Hi",
                                      lm_service_config={"max_new_tokens": 8, "max_tokens": 8}).split_attributes()
    assert keys == {}
    assert attributes["lm_service_config"] == {"max_new_tokens": 8, "max_tokens": 8}


def test_a_short_key_does_not_garble_the_answer(tmp_path):
    with recording_server(skill_reply("The capital of France is Paris.")) as skill:
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 30)})
        body = client.post("/", json={"user_id": "ann", "payload": "Capital?", "api_key": "e"}).get_json()
    assert body["response"] == "The capital of France is Paris."


def _all_bytes_of(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file() and "pipeline" not in path.name)


# --- state -----------------------------------------------------------------------------------------

def test_a_multi_turn_dialog_is_stored_in_order_and_readable(tmp_path):
    with recording_server(skill_reply("Noted.")) as skill:
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 30)})
        ids = {client.post("/", json={"user_id": "ann", "payload": f"turn {i}"}).get_json()["dialog_id"] for i in range(3)}
    [dialog_id] = ids
    dialog = client.get(f"/api/dialogs/{dialog_id}").get_json()
    assert [u["text"] for u in dialog["utterances"]] == ["turn 0", "Noted.", "turn 1", "Noted.", "turn 2", "Noted."]
    assert dialog["human"]["user_external_id"] == "ann"
    assert all(u["hypotheses"][0]["skill_name"] == "s" for u in dialog["human_utterances"])


def test_a_long_dialog_is_stored_whole_but_skills_see_only_its_recent_utterances(tmp_path):
    with recording_server(skill_reply("Noted.")) as skill:
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 30)})
        for i in range(25):
            dialog_id = client.post("/", json={"user_id": "ann", "payload": f"turn {i}"}).get_json()["dialog_id"]
    [sent] = skill.requests[-1].json()["dialogs"]
    assert len(sent["utterances"]) == 20 and sent["utterances"][-1]["text"] == "turn 24"
    assert len(client.get(f"/api/dialogs/{dialog_id}").get_json()["utterances"]) == 50


def test_start_begins_a_new_dialog(tmp_path):
    with recording_server(skill_reply("Hi.")) as skill:
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 30)})
        first = client.post("/", json={"user_id": "ann", "payload": "one"}).get_json()["dialog_id"]
        client.post("/", json={"user_id": "ann", "payload": "/start"})
        second = client.post("/", json={"user_id": "ann", "payload": "two"}).get_json()["dialog_id"]
    assert first != second
    assert client.get("/api/user/ann").get_json()["dialog_ids"] == [first, second]


# --- bad input -------------------------------------------------------------------------------------

@pytest.fixture
def client(tmp_path):
    return make_client(tmp_path, {"s": ("http://127.0.0.1:9/respond", 1)}, MAX_PAYLOAD_CHARS="100",
                       MAX_REQUEST_BYTES="4096")


def test_a_turn_without_user_id_is_a_400_naming_it(client):
    assert_dream_error(client.post("/", json={"payload": "Hi"}), 400, "user_id")


def test_a_body_that_is_not_json_is_a_400(client):
    assert_dream_error(client.post("/", data="Hi there", content_type="application/json"), 400, None)


def test_a_payload_that_is_not_a_string_is_a_400_naming_it(client):
    assert_dream_error(client.post("/", json={"user_id": "ann", "payload": ["Hi"]}), 400, "payload")


def test_a_payload_over_the_limit_is_a_413_naming_it(client):
    assert_dream_error(client.post("/", json={"user_id": "ann", "payload": "x" * 101}), 413, "payload")


def test_a_body_over_the_limit_is_a_413(client):
    assert_dream_error(client.post("/", json={"user_id": "ann", "payload": "x", "note": "y" * 5000}), 413)


def test_attributes_nested_too_deep_are_a_400_naming_the_field(client):
    deep = []
    for _ in range(100):
        deep = [deep]
    assert_dream_error(client.post("/", json={"user_id": "ann", "payload": "x", "memo": deep}), 400, "memo")


def test_json_nested_past_the_parsers_limit_is_a_400(client):
    body = "[" * 1800 + "]" * 1800  # under the 4096-byte limit, past the parser's recursion limit
    assert_dream_error(client.post("/", data=body, content_type="application/json"), 400, None)


def test_an_unknown_dialog_id_is_a_404(client):
    assert_dream_error(client.get("/api/dialogs/0123456789abcdef"), 404)


def test_health_lists_the_pipeline_and_ping_answers(client):
    health = client.get("/health")
    assert health.status_code == 200 and "skills.s" in health.get_json()["pipeline"]
    assert client.get("/ping").get_json() == "pong"


def test_health_and_ping_are_503_while_a_wait_host_does_not_accept_connections(tmp_path):
    client = make_client(tmp_path, {"s": ("http://127.0.0.1:9/respond", 1)}, WAIT_HOSTS="127.0.0.1:9")
    response = client.get("/health")
    assert response.status_code == 503 and response.get_json()["waiting_for"] == ["127.0.0.1:9"]
    error = assert_dream_error(client.post("/ping"), 503)
    assert "127.0.0.1:9" in error["message"]


def test_ping_answers_pong_once_every_wait_host_accepts_connections(tmp_path):
    with recording_server(skill_reply("Hi.")) as skill:
        host = skill.url("").removeprefix("http://")
        client = make_client(tmp_path, {"s": (skill.url("/respond"), 1)}, WAIT_HOSTS=host)
        assert client.post("/ping").get_json() == "pong"
