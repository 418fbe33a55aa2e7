"""API keys on every service, for real (tier: real gunicorn processes on loopback, the LLM on the
tiny model; the unit tests at the end run in-process).

The four services run with PARLEY_API_KEYS (two keys, as while one is rotated out). Each one's
route list is taken from its own /openapi.json (read with the key), so a route added later is
checked without touching this test (tests/test_openapi.py checks that the document lists every
route an app serves): every operation but GET /health and GET /ping answers 401 without a key,
with a wrong one and with another scheme, in the API's own error shape (OpenAI's under /v1, Dream's
elsewhere), and anything but 401 with either key in either header. A turn through the guarded
agent → skill → LLM is answered: each sends its key on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid

import pytest
import requests

from common.auth import ApiKeys, presented_key
from common.settings_support import SettingsError
from skills.prompted_skill.app import create_app as create_skill
from skills.prompted_skill.settings import Settings as SkillSettings
from support.errors import assert_dream_error
from support.servers import service_server
from support.tiny_model import tiny_model_dir
from support.tiny_stack import agent_service, llm_service, skill_service

KEY = "parley-test-key-" + uuid.uuid4().hex
SECOND_KEY = "parley-second-key-" + uuid.uuid4().hex
WRONG_KEY = "parley-wrong-key-" + uuid.uuid4().hex
KEYS_ENV = {"PARLEY_API_KEYS": f"{KEY},{SECOND_KEY}", "SERVICE_HOST": "127.0.0.1"}
PUBLIC = {("GET", "/health"), ("GET", "/ping")}
REFUSED_HEADERS = {
    "no key": {},
    "a wrong bearer key": {"Authorization": f"Bearer {WRONG_KEY}"},
    "a wrong X-Api-Key": {"X-Api-Key": WRONG_KEY},
    "the key under another scheme": {"Authorization": f"Basic {KEY}"},
}
ACCEPTED_HEADERS = {
    "the first key as bearer": {"Authorization": f"Bearer {KEY}"},
    "the second key as X-Api-Key": {"X-Api-Key": SECOND_KEY},
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Every service with keys: the LLM, the skill asking it, the agent, and the OpenAI-API LLM
    forwarding to the LLM's /v1 (whose key is its upstream's key, OPENAI_API_KEY)."""
    folder = tmp_path_factory.mktemp("security")
    with llm_service(folder, **KEYS_ENV) as llm, skill_service(folder, llm, **KEYS_ENV) as skill, \
            agent_service(folder, skill, folder / "state.sqlite3", **KEYS_ENV) as agent, \
            service_server("openai_api_lm", {**KEYS_ENV, "OPENAI_BASE_URL": llm.url("/v1"), "OPENAI_API_KEY": KEY,
                                             "PRETRAINED_MODEL_NAME_OR_PATH": tiny_model_dir().name}) as forwarder:
        yield {"agent": agent, "prompted_skill": skill, "transformers_lm": llm, "openai_api_lm": forwarder}


def documented_operations(server) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the service's own OpenAPI document."""
    document = requests.get(server.url("/openapi.json"), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert document.status_code == 200
    return [(method.upper(), path) for path, operations in document.json()["paths"].items() for method in operations]


def call(server, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    """The operation with its path parameters filled in and, for a POST, an empty JSON object."""
    url = server.url(re.sub(r"\{[^}]+\}", "some-id", path))
    return requests.request(method, url, headers=headers, json={} if method == "POST" else None, timeout=60)


def assert_refused(response: requests.Response, path: str) -> None:
    assert response.status_code == 401, (path, response.status_code, response.text[:300])
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert KEY not in response.text and WRONG_KEY not in response.text  # the key presented is never echoed
    if path.startswith("/v1/"):
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key", error
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert_dream_error(response, 401, "Authorization")


@pytest.mark.parametrize("service", ["agent", "prompted_skill", "transformers_lm", "openai_api_lm"])
def test_every_documented_route_but_health_and_ping_needs_one_of_the_keys(guarded, service):
    server = guarded[service]
    operations = documented_operations(server)
    guarded_operations = [operation for operation in operations if operation not in PUBLIC]

    for method, path in guarded_operations:
        for headers in REFUSED_HEADERS.values():
            assert_refused(call(server, method, path, headers), path)
        for headers in ACCEPTED_HEADERS.values():
            answer = call(server, method, path, headers)
            assert answer.status_code != 401, (method, path, answer.text[:300])
    for method, path in PUBLIC:
        assert call(server, method, path, {}).status_code == 200

    assert ("GET", "/metrics") in guarded_operations and ("GET", "/openapi.json") not in operations
    assert len(guarded_operations) >= 3, operations


@pytest.mark.parametrize("service", ["agent", "transformers_lm"])
def test_a_route_the_service_does_not_have_is_401_without_the_key_so_routes_cannot_be_probed(guarded, service):
    server = guarded[service]
    unknown = requests.get(server.url("/no/such/route"), timeout=30)
    known_with_key = requests.get(server.url("/no/such/route"), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    document = requests.get(server.url("/openapi.json"), timeout=30)

    assert unknown.status_code == 401
    assert known_with_key.status_code == 404
    assert document.status_code == 401


def test_a_turn_through_the_guarded_agent_skill_and_llm_is_answered_as_each_sends_its_key_on(guarded):
    answer = requests.post(guarded["agent"].url("/"), headers={"Authorization": f"Bearer {KEY}"},
                           json={"user_id": "security", "payload": "Hello there"}, timeout=120)

    assert answer.status_code == 200, answer.text
    assert answer.json()["active_skill"] == "prompted_skill"  # the skill answered, so the LLM took its key


def test_the_openai_api_llm_reaches_a_guarded_upstream_with_its_own_upstream_key(guarded):
    answer = requests.post(guarded["openai_api_lm"].url("/respond"), headers={"X-Api-Key": SECOND_KEY},
                           json={"dialog_contexts": [["Hi"]], "configs": [{"max_new_tokens": 4}]}, timeout=120)

    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 1


def test_the_official_openai_client_sends_its_api_key_as_the_bearer_key(guarded):
    import openai

    llm = guarded["transformers_lm"]
    accepted = openai.OpenAI(base_url=llm.url("/v1"), api_key=KEY).models.list()
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=llm.url("/v1"), api_key=WRONG_KEY, max_retries=0).models.list()

    assert [model.id for model in accepted.data][0] == tiny_model_dir().name
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "authentication_error"


def test_a_service_without_keys_on_every_interface_warns_at_start_naming_the_setting(tmp_path):
    with service_server("prompted_skill", {"SERVICE_HOST": "0.0.0.0", "PARLEY_API_KEYS": ""}) as open_skill:
        open_log = open_skill.log_through_now()
    with service_server("prompted_skill", {"SERVICE_HOST": "127.0.0.1", "PARLEY_API_KEYS": ""}) as local_skill:
        local_log = local_skill.log_through_now()

    warning = next(line for line in open_log.splitlines() if "without PARLEY_API_KEYS" in line)
    assert "WARNING" in warning and "0.0.0.0" in warning and "parley secrets init" in warning
    assert "without PARLEY_API_KEYS" not in local_log  # loopback only: nobody else can reach it


def test_a_service_reads_its_keys_from_a_file_as_a_docker_secret_gives_them(tmp_path):
    secret = tmp_path / "parley_api_keys"
    secret.write_text(f"{KEY}\n")
    with service_server("prompted_skill", {"PARLEY_API_KEYS_FILE": str(secret), "SERVICE_HOST": "127.0.0.1"}) as skill:
        refused = requests.get(skill.url("/metrics"), timeout=30)
        accepted = requests.get(skill.url("/metrics"), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    assert refused.status_code == 401
    assert accepted.status_code == 200


# --- in-process: the rules themselves ----------------------------------------------------------------


def test_every_configured_key_is_compared_in_constant_time_even_after_a_match(monkeypatch):
    compared = []
    compare_digest = hmac.compare_digest

    def counting_compare_digest(a, b):
        compared.append((len(a), len(b)))
        return compare_digest(a, b)

    monkeypatch.setattr("common.auth.hmac.compare_digest", counting_compare_digest)
    keys = ApiKeys([KEY, SECOND_KEY, WRONG_KEY + "x"])

    assert keys.accepts(KEY)
    assert not keys.accepts("short")
    # Three keys compared each time, all as SHA-256 digests: neither position nor length shows.
    assert compared == [(hashlib.sha256().digest_size,) * 2] * 6


def test_a_key_comes_as_a_bearer_token_or_an_x_api_key_header():
    assert presented_key({"Authorization": f"Bearer {KEY}"}) == KEY
    assert presented_key({"Authorization": f"bearer   {KEY} "}) == KEY
    assert presented_key({"X-Api-Key": KEY}) == KEY
    assert presented_key({"Authorization": f"Basic {KEY}"}) is None
    assert presented_key({}) is None


@pytest.mark.parametrize("value, message", [
    ("short-key", "at least 16"),
    ("a key with spaces in it!!", "a character other than"),
])
def test_an_unusable_key_stops_the_service_with_a_message_that_does_not_quote_it(value, message):
    with pytest.raises(SettingsError) as refused:
        SkillSettings.from_env({"PARLEY_API_KEYS": value})

    assert message in str(refused.value) and "PARLEY_API_KEYS" in str(refused.value)
    assert value not in str(refused.value)


def test_a_missing_key_file_is_named_in_the_error(tmp_path):
    with pytest.raises(SettingsError, match="PARLEY_API_KEYS_FILE .* cannot be read"):
        SkillSettings.from_env({"PARLEY_API_KEYS_FILE": str(tmp_path / "absent")})


def test_keys_are_not_in_the_settings_repr_or_dump():
    settings = SkillSettings.from_env({"PARLEY_API_KEYS": KEY})

    assert settings.api_keys == (KEY,)
    assert KEY not in repr(settings) and KEY not in json.dumps(settings.model_dump(mode="json"))


def test_an_app_without_keys_on_every_interface_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        create_skill(SkillSettings.from_env({"SERVICE_HOST": "0.0.0.0"}))
        create_skill(SkillSettings.from_env({"SERVICE_HOST": "127.0.0.1"}))

    assert sum("without PARLEY_API_KEYS" in record.getMessage() for record in caplog.records) == 1
