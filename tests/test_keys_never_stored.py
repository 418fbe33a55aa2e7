"""A user's LLM key, wherever a Dream client puts it in a turn, reaches the LLM that needs it and is
found in no log and not in the database file (tier: real gunicorn processes on loopback).

The chain is real: agent → prompted skill → OpenAI-API LLM (ALLOW_REQUEST_API_KEYS=1, no key of
its own) → an upstream, the tiny-model LLM service, whose PARLEY_API_KEYS are exactly the users'
keys. So a turn is answered by the prompted skill only if its key made it all the way (a wrong key
is refused by the upstream, and the last-chance service answers: the control). The keys sit where
Dream's clients put them: top-level fields (`OPENAI_API_KEY`, `openai_api_key`), the `api_keys`
object, Dream's universal skill's `lm_service_kwargs`, an object nested in the attributes, and
Dream's sending variables (`openai_api_keys: [...]`), top-level and in `lm_service_kwargs`. Then
the SQLite file (and its -wal/-shm), every service's log (LOG_LEVEL=debug) and the stored dialog
served back are searched for each key.
"""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from support.servers import service_server
from support.tiny_model import tiny_model_dir
from support.tiny_stack import agent_service, llm_service, skill_service

SERVICE_KEY = "parley-service-key-" + uuid.uuid4().hex
RUN = uuid.uuid4().hex[:10]


def user_key(place: str) -> str:
    return f"sk-{place}-{RUN}-{uuid.uuid4().hex[:12]}"


# Where Dream clients put a key, each with a key of its own.
PLACES = {
    "top-level OPENAI_API_KEY": lambda key: {"OPENAI_API_KEY": key},
    "top-level openai_api_key (Dream's README)": lambda key: {"openai_api_key": key},
    "the api_keys object": lambda key: {"api_keys": {"openai_api_key": key}},
    "lm_service_kwargs (Dream's universal skill)": lambda key: {"lm_service_kwargs": {"openai_api_key": key}},
    "an object nested in the attributes": lambda key: {"attributes": {"credentials": {"OPENAI_API_KEY": key}}},
    "a sending variable, openai_api_keys": lambda key: {"openai_api_keys": [key]},
    "a sending variable in lm_service_kwargs": lambda key: {"lm_service_kwargs": {"openai_api_keys": [key], "note": "kept"}},
}
KEYS = {place: user_key(f"place{index}") for index, place in enumerate(PLACES)}
REFUSED_KEY = user_key("refused")
DEBUG = {"LOG_LEVEL": "debug"}


# Greedy: whether a turn reaches the skill must depend on its key alone. The tiny model's sampled
# answers through the OpenAI forwarder (which has no minimum length) were now and then empty, and
# an empty answer also leaves the turn to the last-chance service.
GREEDY_CONFIG = {"max_new_tokens": 8, "do_sample": False, "num_return_sequences": 1}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    greedy = folder / "greedy-generative-config.json"
    greedy.write_text(json.dumps(GREEDY_CONFIG))
    guarded = {"PARLEY_API_KEYS": SERVICE_KEY, "SERVICE_HOST": "127.0.0.1", **DEBUG}
    with llm_service(folder, PARLEY_API_KEYS=",".join(KEYS.values()), SERVICE_HOST="127.0.0.1", **DEBUG) as upstream, \
            service_server("openai_api_lm", {**guarded, "OPENAI_BASE_URL": upstream.url("/v1"), "ALLOW_REQUEST_API_KEYS": "1",
                                             "PRETRAINED_MODEL_NAME_OR_PATH": tiny_model_dir().name, "OPENAI_API_KEY": ""}) as forwarder, \
            skill_service(folder, forwarder, **guarded, GENERATIVE_SERVICE_CONFIG=str(greedy),
                          LLM_ENDPOINTS=json.dumps({forwarder.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY"]}})) as skill, \
            agent_service(folder, skill, folder / "state.sqlite3", **guarded) as agent:
        yield {"agent": agent, "servers": [agent, skill, forwarder, upstream], "folder": folder}


def turn(agent, user_id: str, fields: dict) -> dict:
    answer = requests.post(agent.url("/"), headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                           json={"user_id": user_id, "payload": "Hello there", **fields}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def turns(chain):
    answers = {place: turn(chain["agent"], f"keys-{index}", fields(KEYS[place]))
               for index, (place, fields) in enumerate(PLACES.items())}
    answers["refused"] = turn(chain["agent"], "keys-refused", {"openai_api_key": REFUSED_KEY})
    return answers


@pytest.mark.parametrize("place", PLACES)
def test_a_key_in_each_place_dream_clients_put_one_reaches_the_llm_that_needs_it(turns, place):
    assert turns[place]["active_skill"] == "prompted_skill", turns[place]


def test_a_key_the_upstream_does_not_know_is_refused_there_so_the_others_did_arrive(turns):
    assert turns["refused"]["active_skill"] != "prompted_skill"


def test_no_key_is_in_the_database_file(chain, turns):
    stored = b"".join(path.read_bytes() for path in chain["folder"].glob("state.sqlite3*"))

    assert stored  # the turns are there
    assert [place for place, key in KEYS.items() if key.encode() in stored] == []
    assert REFUSED_KEY.encode() not in stored


def test_no_key_is_in_any_services_log(chain, turns):
    logs = {server.base_url: server.log_through_now() for server in chain["servers"]}

    assert all("POST" in log for log in logs.values())  # each served the turns, at debug level
    found = {(url, place) for url, log in logs.items() for place, key in [*KEYS.items(), ("refused", REFUSED_KEY)]
             if key in log}
    assert found == set()


def test_the_stored_dialog_holds_the_rest_of_the_turn_but_no_key(chain, turns):
    headers = {"Authorization": f"Bearer {SERVICE_KEY}"}
    served = {place: requests.get(chain["agent"].url(f"/api/dialogs/{answer['dialog_id']}"), headers=headers, timeout=30).text
              for place, answer in turns.items()}

    assert [place for place, text in served.items() if any(key in text for key in [*KEYS.values(), REFUSED_KEY])] == []
    kept = json.loads(served["a sending variable in lm_service_kwargs"])["human_utterances"][-1]["attributes"]
    assert kept["lm_service_kwargs"] == {"note": "kept"}  # the key went, the rest of the object stayed
