"""The OpenAI-API LLM service: what it sends upstream, what it answers, and how it fails.

The upstream here is a recording HTTP server of ours on loopback (tests/support/recording_server.py):
these tests are about the service's own logic — the chat messages it builds, the parameters it
maps, the key it sends and never shows, the 502/504 it answers instead of hanging. The real
model answers through the real services in tests/test_openai_api_lm_real.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socketserver
import threading
import time

import pytest

from services.openai_api_lm.app import create_app
from services.openai_api_lm.settings import Settings, SettingsError
from support.errors import assert_dream_error
from support.recording_server import Reply, recording_server
from support.servers import free_port

SECRET = "sk-test-0123456789abcdef-SECRET"


def completion(*texts: str | None) -> dict:
    """A chat completion as OpenAI answers it, one choice per text."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "upstream-model",
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for index, text in enumerate(texts)
        ],
    }


def answering(*texts: str | None):
    return lambda request: Reply(200, completion(*texts))


def echoing_n(request):
    """Answers as many choices as the request's `n`, each naming its number."""
    n = request.json().get("n", 1)
    return Reply(200, completion(*(f"answer {i}" for i in range(n))))


def make_client(upstream_url: str, **env: str):
    settings = Settings.from_env(
        {"OPENAI_BASE_URL": upstream_url, "PRETRAINED_MODEL_NAME_OR_PATH": "upstream-model", **env}
    )
    return create_app(settings).test_client()


def ask(client, *dialog: str, prompt: str | None = None, config: dict | None = None, **fields):
    body: dict = {"dialog_contexts": [list(dialog)], **fields}
    if prompt is not None:
        body["prompts"] = [prompt]
    if config is not None:
        body["configs"] = [config]
    return client.post("/respond", json=body)


# --- what goes upstream ----------------------------------------------------------------------------

def test_prompt_is_the_system_message_and_the_dialog_alternates_ending_with_the_user():
    with recording_server(answering("Paris.")) as upstream:
        client = make_client(upstream.url("/v1"))
        response = ask(client, "Hi!", "Hello, how can I help?", "What is the capital of France?", prompt="Be brief.")
    assert response.status_code == 200, response.text
    [sent] = upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.json()["model"] == "upstream-model"
    assert sent.json()["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
    ]


def test_an_even_dialog_starts_with_the_assistant_and_an_empty_prompt_sends_no_system_message():
    with recording_server(answering("ok")) as upstream:
        ask(make_client(upstream.url("/v1")), "Welcome!", "Thanks", prompt="")
    assert [m["role"] for m in upstream.requests[0].json()["messages"]] == ["assistant", "user"]


def test_hypotheses_come_back_per_dialog_num_return_sequences_each_in_order():
    with recording_server(echoing_n) as upstream:
        client = make_client(upstream.url("/v1"))
        response = client.post(
            "/respond",
            json={
                "dialog_contexts": [["first"], ["second"]],
                "prompts": ["", ""],
                "configs": [{"num_return_sequences": 2}, {"num_return_sequences": 3}],
            },
        )
    assert response.status_code == 200, response.text
    assert response.get_json() == [["answer 0", "answer 1"], ["answer 0", "answer 1", "answer 2"]]
    sent = {request.json()["messages"][0]["content"]: request.json()["n"] for request in upstream.requests}
    assert sent == {"first": 2, "second": 3}


def test_an_upstream_that_ignores_n_is_asked_again_for_the_rest():
    with recording_server(answering("only one")) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi", config={"n": 3})
    assert response.get_json() == [["only one", "only one", "only one"]]
    assert [request.json()["n"] for request in upstream.requests] == [3, 2, 1]


def test_a_greedy_config_is_sent_as_temperature_zero_with_openai_names():
    with recording_server(answering("ok")) as upstream:
        ask(make_client(upstream.url("/v1")), "Hi", config={"max_new_tokens": 7, "do_sample": False, "stop": ["\n"], "seed": 3})
    sent = upstream.requests[0].json()
    assert {key: sent[key] for key in ("max_tokens", "n", "temperature", "stop", "seed")} == {
        "max_tokens": 7, "n": 1, "temperature": 0.0, "stop": ["\n"], "seed": 3,
    }
    assert "top_p" not in sent and "max_new_tokens" not in sent


def test_dreams_openai_config_is_accepted_and_samples_at_its_temperature():
    dream_chatgpt_config = {"max_tokens": 256, "temperature": 0.4, "top_p": 0.95, "frequency_penalty": 0, "presence_penalty": 0.5}
    with recording_server(answering("ok")) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi", config=dream_chatgpt_config)
    assert response.status_code == 200, response.text
    sent = upstream.requests[0].json()
    assert {key: sent.get(key) for key in ("max_tokens", "temperature", "top_p", "presence_penalty")} == {
        "max_tokens": 256, "temperature": 0.4, "top_p": 0.95, "presence_penalty": 0.5,
    }


def test_a_response_format_in_the_config_is_sent_upstream_as_openai_takes_it():
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    with recording_server(answering('{"a": 1}')) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi", config={"response_format": response_format})
    assert response.status_code == 200, response.text
    assert upstream.requests[0].json()["response_format"] == response_format


def test_the_generative_config_file_is_the_default_and_a_request_config_overrides_it(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text('{"max_tokens": 50, "temperature": 0.7, "num_return_sequences": 2}')
    with recording_server(echoing_n) as upstream:
        client = make_client(upstream.url("/v1"), GENERATIVE_CONFIG=str(config_file))
        ask(client, "Hi")
        ask(client, "Hi", config={"max_new_tokens": 9})
    defaults, overridden = (request.json() for request in upstream.requests)
    assert (defaults["max_tokens"], defaults["temperature"], defaults["n"]) == (50, 0.7, 2)
    assert (overridden["max_tokens"], overridden["temperature"], overridden["n"]) == (9, 0.7, 2)


def test_generate_goals_asks_once_per_prompt_with_the_shared_goals_prompt_and_answers_one_text_each():
    with recording_server(echoing_n) as upstream:
        response = make_client(upstream.url("/v1")).post(
            "/generate_goals",
            json={"prompts": ["You are Chef Bot.", "You are Tutor Bot."], "configs": [None, {"num_return_sequences": 3}]},
        )
    assert response.status_code == 200, response.text
    assert response.get_json() == ["answer 0", "answer 0"]
    sent = sorted((request.json() for request in upstream.requests), key=lambda body: body["messages"][0]["content"])
    assert [body["n"] for body in sent] == [1, 1]
    [[chef_message], [tutor_message]] = [body["messages"] for body in sent]
    assert chef_message["role"] == "user"
    assert "'''You are Chef Bot.'''" in chef_message["content"] and "{prompt}" not in chef_message["content"]
    assert "'''You are Tutor Bot.'''" in tutor_message["content"]


def test_a_null_content_is_an_empty_hypothesis():
    with recording_server(answering(None)) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi")
    assert response.get_json() == [[""]]


# --- the key ---------------------------------------------------------------------------------------

def test_the_key_reaches_the_upstream_only_in_the_authorization_header():
    with recording_server(answering("ok")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY_ENV_VAR="MY_LLM_KEY", MY_LLM_KEY=SECRET)
        ask(client, "Hi")
    [sent] = upstream.requests
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET.encode() not in sent.body


def test_without_a_key_no_authorization_header_is_sent():
    with recording_server(answering("ok")) as upstream:
        ask(make_client(upstream.url("/v1")), "Hi")
    assert "Authorization" not in upstream.requests[0].headers


def test_a_requests_own_key_is_ignored_unless_allowed():
    with recording_server(answering("ok")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY=SECRET)
        ask(client, "Hi", openai_api_keys=["sk-from-the-request"])
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {SECRET}"


def test_a_requests_own_key_replaces_the_services_when_allowed():
    with recording_server(answering("ok")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY=SECRET, ALLOW_REQUEST_API_KEYS="1")
        ask(client, "Hi", openai_api_keys=["sk-from-the-request"], openai_api_organizations=["org-1"])
    assert upstream.requests[0].headers["Authorization"] == "Bearer sk-from-the-request"
    assert upstream.requests[0].headers["OpenAI-Organization"] == "org-1"


def test_the_key_field_named_after_the_cards_key_variable_is_accepted():
    with recording_server(answering("ok")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY_ENV_VAR="GROQ_KEY", ALLOW_REQUEST_API_KEYS="true")
        response = ask(client, "Hi", groq_keys=["gsk-from-the-skill"])
    assert response.status_code == 200, response.text
    assert upstream.requests[0].headers["Authorization"] == "Bearer gsk-from-the-skill"


def test_an_upstream_401_is_a_502_that_does_not_echo_the_key(caplog):
    def rejecting(request):
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return Reply(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}})

    caplog.set_level(logging.DEBUG)
    with recording_server(rejecting) as upstream:
        response = ask(make_client(upstream.url("/v1"), OPENAI_API_KEY=SECRET), "Hi")
    error = assert_dream_error(response, 502)
    assert "401" in error["message"] and "Incorrect API key provided" in error["message"]
    assert SECRET not in response.text
    assert SECRET not in caplog.text


def test_the_key_appears_in_no_log_line_of_a_whole_conversation(caplog):
    caplog.set_level(logging.DEBUG)  # urllib3 and every logger of ours, at their most talkative
    with recording_server(answering("ok")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY=SECRET, ALLOW_REQUEST_API_KEYS="1")
        ask(client, "Hi")
        ask(client, "Hi", openai_api_keys=[SECRET + "-per-request"])
        client.post("/generate_goals", json={"prompts": ["You are Chef Bot."]})
        upstream.answer = lambda request: Reply(500, {"error": {"message": f"boom {SECRET}"}})
        ask(client, "Hi")
    assert len(upstream.requests) == 4
    assert "forwards to" in caplog.text  # the log was captured
    assert SECRET not in caplog.text


def test_settings_repr_and_errors_never_show_the_key():
    settings = Settings.from_env({"OPENAI_BASE_URL": "http://x/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m", "OPENAI_API_KEY": SECRET})
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"OPENAI_BASE_URL": SECRET, "PRETRAINED_MODEL_NAME_OR_PATH": "m"})
    assert "OPENAI_BASE_URL" in str(raised.value) and SECRET not in str(raised.value)


# --- upstream failures: an answer, never a hang ----------------------------------------------------

def test_a_closed_port_is_a_502_at_once():
    client = make_client(f"http://127.0.0.1:{free_port()}/v1", GENERATIVE_TIMEOUT="30")
    started = time.monotonic()
    response = ask(client, "Hi")
    elapsed = time.monotonic() - started
    error = assert_dream_error(response, 502)
    assert "cannot reach the upstream" in error["message"]
    assert elapsed < 10, f"a refused connection must not wait for the timeout ({elapsed:.1f}s)"


def test_an_upstream_that_hangs_is_a_504_after_generative_timeout():
    with recording_server(lambda request: Reply(200, completion("late"), delay_seconds=30)) as upstream:
        client = make_client(upstream.url("/v1"), GENERATIVE_TIMEOUT="1")
        started = time.monotonic()
        response = ask(client, "Hi")
        elapsed = time.monotonic() - started
    assert_dream_error(response, 504)
    assert 0.9 < elapsed < 10, f"answered after {elapsed:.1f}s with GENERATIVE_TIMEOUT=1"


@contextlib.contextmanager
def upstream_dropping_first_connections(dropped: int):
    """A raw HTTP server that closes its first `dropped` connections unanswered, then answers "ok"."""
    connections = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            connections.append(self.client_address)
            head = b""
            while b"\r\n\r\n" not in head:
                head += self.request.recv(65536)
            if len(connections) <= dropped:
                return  # closed without a word, as an upstream closing a kept-alive connection
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += self.request.recv(65536)
            payload = json.dumps(completion("ok")).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n")
            self.wfile.write(b"Content-Length: %d\r\n\r\n" % len(payload) + payload)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", connections
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_the_upstream_drops_unanswered_is_tried_once_more():
    with upstream_dropping_first_connections(1) as (url, connections):
        response = ask(make_client(url), "Hi")
    assert response.get_json() == [["ok"]]
    assert len(connections) == 2


def test_an_upstream_that_keeps_dropping_connections_is_a_502():
    with upstream_dropping_first_connections(10) as (url, connections):
        response = ask(make_client(url), "Hi")
    error = assert_dream_error(response, 502)
    assert "closed the connection without answering" in error["message"]
    assert len(connections) == 2


def test_an_upstream_500_is_a_502_naming_the_upstreams_message():
    with recording_server(lambda request: Reply(500, {"error": {"message": "model overloaded"}})) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi")
    error = assert_dream_error(response, 502)
    assert "500" in error["message"] and "model overloaded" in error["message"]


@pytest.mark.parametrize("body", [{"not": "a completion"}, ["a", "list"], {"choices": []}])
def test_an_upstream_answer_that_is_not_a_chat_completion_is_a_502(body):
    with recording_server(lambda request: Reply(200, body)) as upstream:
        response = ask(make_client(upstream.url("/v1")), "Hi")
    assert_dream_error(response, 502)


def test_when_one_dialog_fails_the_request_fails_rather_than_answering_empty():
    def failing_second(request):
        if request.json()["messages"][-1]["content"] == "bad":
            return Reply(500, {"error": {"message": "nope"}})
        return Reply(200, completion("ok"))

    with recording_server(failing_second) as upstream:
        response = make_client(upstream.url("/v1")).post("/respond", json={"dialog_contexts": [["good"], ["bad"]]})
    assert_dream_error(response, 502)


# --- bad input: 400 naming the field ---------------------------------------------------------------

@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "dialog_contexts"),
        ({"dialog_contexts": "Hi"}, "dialog_contexts"),
        ({"dialog_contexts": [[]]}, "dialog_contexts[0]"),
        ({"dialog_contexts": [["Hi"]], "prompts": ["a", "b"]}, "prompts"),
        ({"dialog_contexts": [["Hi"]], "configs": [{"max_token": 5}]}, "configs[0].max_token"),
        ({"dialog_contexts": [["Hi"]], "configs": [{"temperature": 3.0}]}, "configs[0].temperature"),
        ({"dialog_contexts": [["Hi"]], "configs": [{"max_tokens": 100000}]}, "configs[0].max_new_tokens"),
        ({"dialog_contexts": [["Hi"]], "configs": [{"n": 2, "num_return_sequences": 2}]}, "configs[0].n"),
        ({"dialog_contexts": [["Hi"]], "openai_api_keys": ["a", "b"]}, "openai_api_keys"),
        ({"dialog_contexts": [["Hi"]], "dialog_context": [["Hi"]]}, "dialog_context"),
    ],
)
def test_bad_respond_input_is_a_400_naming_the_field(body, field):
    with recording_server(answering("ok")) as upstream:
        response = make_client(upstream.url("/v1")).post("/respond", json=body)
    assert_dream_error(response, 400, field)
    assert upstream.requests == []


def test_generate_goals_without_prompts_is_a_400_naming_prompts():
    response = make_client("http://127.0.0.1:9/v1").post("/generate_goals", json={"prompt": "x"})
    assert_dream_error(response, 400)
    assert_dream_error(make_client("http://127.0.0.1:9/v1").post("/generate_goals", json={}), 400, "prompts")


@pytest.mark.parametrize("body", [b"{", b"[" * 100_000], ids=["cut short", "nested past the parser's limit"])
def test_a_body_that_is_not_json_is_a_400(body):
    response = make_client("http://127.0.0.1:9/v1").post("/respond", data=body, content_type="application/json")
    assert_dream_error(response, 400)
    assert "JSON" in response.get_json()["error"]["message"]


def test_a_body_over_max_request_bytes_is_a_413():
    client = make_client("http://127.0.0.1:9/v1", MAX_REQUEST_BYTES="2048")
    assert_dream_error(ask(client, "x" * 4096), 413)


# --- settings, health, docs ------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["OPENAI_BASE_URL", "PRETRAINED_MODEL_NAME_OR_PATH"])
def test_a_missing_required_setting_is_named(missing):
    env = {"OPENAI_BASE_URL": "http://x/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m"}
    del env[missing]
    with pytest.raises(SettingsError, match=f"missing {missing}"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "variable, value",
    [("OPENAI_BASE_URL", "api.openai.com"), ("OPENAI_API_KEY_ENV_VAR", "sk-looks-like-a-key"), ("GENERATIVE_TIMEOUT", "0"), ("ALLOW_REQUEST_API_KEYS", "maybe")],
)
def test_a_malformed_setting_is_named(variable, value):
    env = {"OPENAI_BASE_URL": "http://x/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m", variable: value}
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_a_generative_config_with_an_unknown_key_stops_the_start(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text('{"max_new_token": 5}')
    settings = Settings.from_env(
        {"OPENAI_BASE_URL": "http://x/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m", "GENERATIVE_CONFIG": str(config_file)}
    )
    with pytest.raises(SettingsError, match="max_new_token"):
        create_app(settings)


def test_a_default_config_over_the_caps_stops_the_start_instead_of_failing_every_request():
    settings = Settings.from_env({"OPENAI_BASE_URL": "http://x/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m", "MAX_NEW_TOKENS_CAP": "24"})
    with pytest.raises(SettingsError, match="max_new_tokens: 120 is above"):
        create_app(settings)


def test_health_names_the_model_and_upstream_and_says_only_whether_a_key_is_set():
    client = make_client("http://upstream:8000/v1", OPENAI_API_KEY=SECRET)
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json() == {
        "status": "ok", "service": "openai-api-lm", "model": "upstream-model",
        "upstream": "http://upstream:8000/v1", "api_key": "set",
    }
    assert client.get("/ping").get_json() == "pong" and client.post("/ping").get_json() == "pong"


# --- /render: what would go upstream, sent nowhere ------------------------------------------------------


def test_render_shows_the_request_respond_would_send_and_sends_nothing():
    with recording_server(answering("Paris.")) as upstream:
        client = make_client(upstream.url("/v1"), OPENAI_API_KEY=SECRET)
        body = {"dialog_contexts": [["Hi!", "Hello!", "What is the capital of France?"]], "prompts": ["Be brief."],
                "configs": [{"max_tokens": 7}]}
        rendered = client.post("/render", json=body)
        sent = ask(client, "Hi!", "Hello!", "What is the capital of France?", prompt="Be brief.", config={"max_tokens": 7})
    assert rendered.status_code == 200 and sent.status_code == 200
    [request] = upstream.requests  # /respond's, not /render's
    [item] = rendered.get_json()["rendered"]
    assert item["request"] == request.json()
    assert item["upstream"] == upstream.url("/v1/chat/completions")
    assert item["prompt_tokens"] is None and "the upstream counts the tokens" in item["prompt_tokens_note"]
    assert SECRET not in rendered.get_data(as_text=True)


def test_v1_render_puts_a_chat_bodys_parameters_over_the_default_config():
    client = make_client("http://127.0.0.1:9/v1")
    body = {"model": "anything", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.7}

    rendered = client.post("/v1/render", json=body).get_json()

    assert rendered["request"] == {
        "model": "upstream-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 1, "temperature": 0.7,
    }
    assert rendered["generation_config"]["max_new_tokens"] == 5


def test_v1_render_answers_bad_input_in_openais_error_shape():
    client = make_client("http://127.0.0.1:9/v1")

    response = client.post("/v1/render", json={"messages": [{"role": "robot", "content": "Hi"}]})

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "messages[0].role"
