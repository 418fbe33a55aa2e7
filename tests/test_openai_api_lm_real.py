"""The OpenAI-API LLM service as gunicorn runs it, in front of real upstreams.

Pointed at this project's own LLM service (`services/transformers_lm` on the embedded SmolLM2,
through its OpenAI `/v1`), it answers Dream's /respond with the real model's words. Pointed at a
recording server of ours, it sends the key in the Authorization header and its log — at debug
level — never holds the key, not even when the upstream echoes it back in an error.
"""

from __future__ import annotations

import pytest
import requests

from support.errors import assert_dream_error
from support.recording_server import Reply, recording_server
from support.servers import free_port, service_server

SECRET = "sk-real-test-fedcba9876543210-SECRET"
GREEDY = {"do_sample": False, "max_new_tokens": 24}


def openai_api_lm(upstream_url: str, **env: str):
    """The service under gunicorn from its own folder, as its Dockerfile runs it."""
    return service_server(
        "openai_api_lm",
        {
            "OPENAI_BASE_URL": upstream_url,
            "PRETRAINED_MODEL_NAME_OR_PATH": "smollm2-135m-instruct",
            "OPENAI_API_KEY_ENV_VAR": "PARLEY_TEST_LLM_KEY",
            "PARLEY_TEST_LLM_KEY": SECRET,
            "LOG_LEVEL": "debug",
            **env,
        },
        startup_timeout_seconds=60,
    )


@pytest.fixture(scope="module")
def lm_through_openai_api(embedded_lm):
    with openai_api_lm(embedded_lm.url("/v1"), GENERATIVE_TIMEOUT="120") as server:
        yield server


@pytest.mark.model
def test_the_embedded_model_answers_the_capital_of_france_through_respond(lm_through_openai_api):
    response = requests.post(
        lm_through_openai_api.url("/respond"),
        json={"dialog_contexts": [["What is the capital of France?"]], "prompts": [""], "configs": [GREEDY]},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    [[answer]] = response.json()
    assert "Paris" in answer


@pytest.mark.model
def test_a_bad_config_is_a_400_from_this_service_not_the_upstream(lm_through_openai_api):
    response = requests.post(
        lm_through_openai_api.url("/respond"),
        json={"dialog_contexts": [["Hi"]], "configs": [{"temperature": -1.0}]},
        timeout=30,
    )
    assert_dream_error(response, 400, "configs[0].temperature")


@pytest.mark.model
def test_the_key_is_in_neither_services_log(embedded_lm, lm_through_openai_api):
    response = requests.post(
        lm_through_openai_api.url("/respond"),
        json={"dialog_contexts": [["Hi"]], "configs": [{"do_sample": False, "max_new_tokens": 1}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert "POST /respond" in (forwarder_log := lm_through_openai_api.log_through_now())
    assert "POST /v1/chat/completions" in (upstream_log := embedded_lm.log_through_now())
    assert SECRET not in forwarder_log
    assert SECRET not in upstream_log


def test_the_key_goes_in_the_authorization_header_and_into_no_log_line():
    with recording_server(lambda request: Reply(200, {"choices": [{"index": 0, "message": {"content": "ok"}}]})) as upstream:
        with openai_api_lm(upstream.url("/v1")) as service:
            answered = requests.post(service.url("/respond"), json={"dialog_contexts": [["Hi"]]}, timeout=30)
            upstream.answer = lambda request: Reply(
                401, {"error": {"message": f"Incorrect API key provided: {request.headers.get('Authorization')}"}}
            )
            rejected = requests.post(service.url("/respond"), json={"dialog_contexts": [["Hi"]]}, timeout=30)
            log = service.log()
    assert answered.json() == [["ok"]]
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert_dream_error(rejected, 502)
    assert SECRET not in rejected.text
    assert "forwards to" in log and "502 for /respond" in log  # the log was written, at debug level
    assert SECRET not in log


def test_pointed_at_a_closed_port_it_answers_502_at_once():
    with openai_api_lm(f"http://127.0.0.1:{free_port()}/v1", GENERATIVE_TIMEOUT="60") as service:
        response = requests.post(service.url("/respond"), json={"dialog_contexts": [["Hi"]]}, timeout=10)
    assert_dream_error(response, 502)
