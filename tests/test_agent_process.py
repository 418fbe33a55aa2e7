"""The agent as it runs: gunicorn processes on loopback, restarted, killed, and talked to at once.

The skill and the LLM behind it are real services of ours or, where the point is what reaches the
LLM (keys, refused URLs), a recording server standing in for a hosted API.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from support.recording_server import Reply, recording_server
from support.servers import GUNICORN, REPO_ROOT, free_port, service_server

DIST_PIPELINE = REPO_ROOT / "assistant_dists/universal_prompted_assistant/pipeline_conf.json"
SECRET = "sk-process-test-secret-7f3a"


def pipeline_with_skill(tmp_path: Path, skill_url: str, timeout: float = 30) -> Path:
    pipeline = json.loads(DIST_PIPELINE.read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"].update(url=skill_url, timeout=timeout)
    path = tmp_path / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return path


def agent_server(tmp_path: Path, skill_url: str, port: int | None = None):
    env = {
        "PIPELINE_CONFIG": str(pipeline_with_skill(tmp_path, skill_url)),
        "STATE_DB_PATH": str(tmp_path / "state" / "dialogs.sqlite3"),
    }
    return service_server("agent", env, port=port, startup_timeout_seconds=60)


def skill_server(llm_url: str, llm_endpoints: dict, **env: str):
    env = {"GENERATIVE_SERVICE_URL": llm_url, "LLM_ENDPOINTS": json.dumps(llm_endpoints), **env}
    return service_server("prompted_skill", env, startup_timeout_seconds=60)


def dream_skill_answer(text: str):
    return lambda request: Reply(200, [[[text], [0.9], [{}], [{}], [{}]]])


def say(agent, user_id: str, payload: str, **fields) -> dict:
    response = requests.post(agent.url("/"), json={"user_id": user_id, "payload": payload, **fields}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_dialogs_survive_a_restart_and_a_kill_of_the_agent(tmp_path):
    with recording_server(dream_skill_answer("Noted.")) as skill:
        port = free_port()
        with agent_server(tmp_path, skill.url("/respond"), port) as agent:
            dialog_id = say(agent, "ann", "one")["dialog_id"]
            say(agent, "ann", "two")
        with agent_server(tmp_path, skill.url("/respond"), port) as agent:  # stopped with SIGTERM above
            assert say(agent, "ann", "three")["dialog_id"] == dialog_id
            os.killpg(agent.process.pid, signal.SIGKILL)
            agent.process.wait(timeout=10)
        with agent_server(tmp_path, skill.url("/respond"), port) as agent:
            dialog = requests.get(agent.url(f"/api/dialogs/{dialog_id}"), timeout=10).json()
    assert [u["text"] for u in dialog["human_utterances"]] == ["one", "two", "three"]
    assert [u["text"] for u in dialog["bot_utterances"]] == ["Noted."] * 3


def test_concurrent_users_each_get_every_turn_stored_once_in_order(tmp_path):
    users, turns = 8, 5
    with recording_server(dream_skill_answer("Ok.")) as skill, agent_server(tmp_path, skill.url("/respond")) as agent:
        def talk(user: int) -> str:
            dialog_ids = {say(agent, f"user-{user}", f"u{user} t{turn}")["dialog_id"] for turn in range(turns)}
            assert len(dialog_ids) == 1
            return dialog_ids.pop()

        with ThreadPoolExecutor(max_workers=users) as pool:
            dialog_ids = list(pool.map(talk, range(users)))
        dialogs = [requests.get(agent.url(f"/api/dialogs/{d}"), timeout=10).json() for d in dialog_ids]
    for user, dialog in enumerate(dialogs):
        assert [u["text"] for u in dialog["human_utterances"]] == [f"u{user} t{turn}" for turn in range(turns)]
        assert [u["user"]["user_type"] for u in dialog["utterances"]] == ["human", "bot"] * turns
    with sqlite3.connect(tmp_path / "state" / "dialogs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM utterances").fetchone()[0] == users * turns * 2


def test_a_key_reaches_only_its_llm_and_appears_in_no_log_line_and_no_stored_state(tmp_path):
    with recording_server(lambda request: Reply(200, [["Hello from the keyed LLM."]])) as llm:
        llm_url = llm.url("/respond")
        endpoints = {llm_url: {"key_env_vars": ["OPENAI_API_KEY"]}}
        with skill_server(llm_url, endpoints) as skill, agent_server(tmp_path, skill.url("/respond")) as agent:
            answer = say(agent, "ann", "Hi", OPENAI_API_KEY=SECRET)
            dialog = requests.get(agent.url(f"/api/dialogs/{answer['dialog_id']}"), timeout=10).text
        logs = agent.log() + skill.log()  # read once both have stopped: every line is written
    assert answer["response"] == "Hello from the keyed LLM."
    assert llm.requests[0].json()["openai_api_keys"] == [SECRET]
    assert SECRET not in json.dumps(answer) and SECRET not in dialog
    assert "Hi" in dialog  # the turn was stored
    assert "POST /respond" in logs and "POST / " in logs  # the services logged the turn
    assert SECRET not in logs
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    assert SECRET.encode() not in state


def test_an_lm_service_url_outside_the_allowlist_is_never_contacted(tmp_path):
    with recording_server(lambda request: Reply(200, [["Allowed."]])) as allowed, \
            recording_server(lambda request: Reply(200, [["Stolen."]])) as outsider:
        endpoints = {allowed.url("/respond"): {"key_env_vars": ["OPENAI_API_KEY"]}}
        with skill_server(allowed.url("/respond"), endpoints) as skill, \
                agent_server(tmp_path, skill.url("/respond")) as agent:
            refused = say(agent, "ann", "Hi", lm_service_url=outsider.url("/respond"), OPENAI_API_KEY=SECRET)
            normal = say(agent, "bob", "Hi")
    assert outsider.connections == 0
    assert refused["active_skill"] == "last_chance_service"
    assert normal["response"] == "Allowed."


@pytest.mark.parametrize(
    ("folder", "setting", "complaint"),
    [("services/agent", {"SERVICE_THREADS": "many"}, "cannot start: SERVICE_THREADS: "),
     ("services/agent", {"PIPELINE_CONFIG": "/no/such/pipeline_conf.json"},
      "cannot start: PIPELINE_CONFIG '/no/such/pipeline_conf.json' does not exist"),
     ("skills/prompted_skill", {"GENERATIVE_TIMEOUT": "soon"}, "cannot start: GENERATIVE_TIMEOUT: "),
     ("services/openai_api_lm",
      {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "any", "GENERATIVE_TIMEOUT": "soon"},
      "cannot start: GENERATIVE_TIMEOUT: ")],
    ids=["agent", "agent's pipeline", "prompted skill", "openai_api_lm"],
)
def test_a_service_that_cannot_start_stops_gunicorn_with_one_line_saying_why(folder, setting, complaint):
    env = {**os.environ, "SERVICE_PORT": str(free_port()), **setting}

    result = subprocess.run(GUNICORN, cwd=REPO_ROOT / folder, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    complaints = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(complaints) == 1 and complaint in complaints[0], result.stderr
    assert "Traceback" not in result.stderr
