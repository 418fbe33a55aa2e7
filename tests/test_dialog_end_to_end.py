"""A dialog end to end on this machine: the agent, the prompted skill and the embedded SmolLM2.

All three run as gunicorn runs them in the images, on free loopback ports, with the distribution's
own pipeline and prompt; the model is started once for the module. Only the LLM's generative config
is the test's own (greedy, short), so answers are reproducible and quick on a busy CPU.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import requests

from support.errors import assert_dream_error
from support.recording_server import recording_server
from support.servers import REPO_ROOT, VENV_BIN, free_port, running_server

pytestmark = pytest.mark.model

GUNICORN = [str(VENV_BIN / "gunicorn"), "--config", "python:common.gunicorn_conf", "server:app"]
DIST = REPO_ROOT / "assistant_dists/universal_prompted_assistant"
SECRET = "sk-end-to-end-secret-9c1d"
# Generation on a shared 2-core machine can take tens of seconds; the timeouts here are not what is tested.
TURN_TIMEOUT = 300


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dialog")


@pytest.fixture(scope="module")
def llm(workdir):
    config = workdir / "greedy.json"
    config.write_text(json.dumps({"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 24}))
    port = free_port()
    env = {
        "SERVICE_PORT": str(port),
        "SERVICE_NAME": "transformers-lm-smollm2",
        "PRETRAINED_MODEL_NAME_OR_PATH": "smollm2-135m-instruct",
        "GENERATIVE_CONFIG": str(config),
        "DEVICE": "cpu",
    }
    with running_server(GUNICORN, port=port, cwd=REPO_ROOT / "services/transformers_lm", env=env,
                        startup_timeout_seconds=600) as server:
        server.config_path = config
        yield server


@pytest.fixture(scope="module")
def skill(llm):
    port = free_port()
    llm_url = llm.url("/respond")
    env = {
        "SERVICE_PORT": str(port),
        "PROMPT_FILE": "common/prompts/universal_prompted_assistant.json",
        "GENERATIVE_SERVICE_URL": llm_url,
        "GENERATIVE_TIMEOUT": str(TURN_TIMEOUT - 20),
        "LLM_ENDPOINTS": json.dumps({llm_url: {"key_env_vars": [], "generative_config": str(llm.config_path)}}),
    }
    with running_server(GUNICORN, port=port, cwd=REPO_ROOT / "skills/prompted_skill", env=env) as server:
        yield server


def agent_env(workdir: Path, skill, port: int) -> dict:
    pipeline = json.loads((DIST / "pipeline_conf.json").read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"].update(url=skill.url("/respond"), timeout=TURN_TIMEOUT - 10)
    path = workdir / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return {
        "SERVICE_PORT": str(port),
        "PIPELINE_CONFIG": str(path),
        "STATE_DB_PATH": str(workdir / "state" / "dialogs.sqlite3"),
        "RESPONSE_TIME_LIMIT": str(TURN_TIMEOUT),
    }


@pytest.fixture(scope="module")
def agent_port() -> int:
    return free_port()


@pytest.fixture
def agent(workdir, skill, agent_port):
    with running_server(GUNICORN, port=agent_port, cwd=REPO_ROOT / "services/agent",
                        env=agent_env(workdir, skill, agent_port)) as server:
        yield server


def say(agent, user_id: str, payload: str, **fields) -> dict:
    response = requests.post(agent.url("/"), json={"user_id": user_id, "payload": payload, **fields}, timeout=TURN_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def paris_dialog(workdir, skill, agent_port):
    """Two turns of one user, the second carrying an API key; kept for the tests that read them back."""
    with running_server(GUNICORN, port=agent_port, cwd=REPO_ROOT / "services/agent",
                        env=agent_env(workdir, skill, agent_port)) as agent:
        first = say(agent, "ann", "What is the capital of France?")
        second = say(agent, "ann", "Thank you!", OPENAI_API_KEY=SECRET)
        agent_log = agent.log()
    return {"first": first, "second": second, "agent_log": agent_log}


def test_the_capital_of_france_is_paris(paris_dialog):
    first = paris_dialog["first"]
    assert "Paris" in first["response"], first
    assert first["active_skill"] == "prompted_skill"


def test_a_multi_turn_dialog_is_stored_and_readable_after_an_agent_restart(paris_dialog, agent):
    dialog_id = paris_dialog["first"]["dialog_id"]
    assert paris_dialog["second"]["dialog_id"] == dialog_id
    dialog = requests.get(agent.url(f"/api/dialogs/{dialog_id}"), timeout=10).json()  # a new agent process
    assert [u["text"] for u in dialog["human_utterances"]] == ["What is the capital of France?", "Thank you!"]
    assert dialog["bot_utterances"][0]["text"] == paris_dialog["first"]["response"]
    assert dialog["bot_utterances"][1]["utt_id"] == paris_dialog["second"]["utt_id"]


def test_a_key_sent_with_a_turn_is_in_no_log_line_and_no_stored_state(paris_dialog, workdir, llm, skill):
    logs = paris_dialog["agent_log"] + skill.log() + llm.log()
    assert SECRET not in logs
    assert SECRET not in json.dumps(paris_dialog["second"])
    with sqlite3.connect(workdir / "state" / "dialogs.sqlite3") as db:
        rows = db.execute("SELECT data FROM utterances").fetchall()
    assert rows and not any(SECRET in data for (data,) in rows)
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in (workdir / "state").iterdir())


def test_an_lm_service_url_outside_the_allowlist_is_never_contacted(agent):
    with recording_server() as outsider:
        answer = say(agent, "eve", "What is the capital of France?", lm_service_url=outsider.url("/respond"))
    assert outsider.connections == 0
    assert answer["active_skill"] == "last_chance_service"


@pytest.mark.parametrize("body, status, field", [
    ({"payload": "Hi"}, 400, "user_id"),
    ({"user_id": "ann", "payload": 42}, 400, "payload"),
    ({"user_id": "ann", "payload": "x" * 5000}, 413, "payload"),
])
def test_bad_agent_input_is_a_json_error_naming_the_field(agent, body, status, field):
    assert_dream_error(requests.post(agent.url("/"), json=body, timeout=10), status, field)


def test_a_body_that_is_not_json_is_a_400(agent):
    response = requests.post(agent.url("/"), data="Hi", headers={"Content-Type": "application/json"}, timeout=10)
    assert_dream_error(response, 400, None)
