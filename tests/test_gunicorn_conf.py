"""How gunicorn runs every service (tier: real gunicorn processes on loopback): a plain
`gunicorn server:app` from the service's folder reads the folder's gunicorn.conf.py, so it binds the
port of the service's Settings and serves requests concurrently on the threaded worker."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import threading

import pytest
import requests

from support.recording_server import Reply, recording_server
from support.servers import GUNICORN, SERVICE_FOLDERS, service_server
from services.agent.settings import Settings as AgentSettings
from services.autoscaler.settings import Settings as AutoscalerSettings
from services.openai_api_lm.settings import Settings as OpenAIApiSettings
from services.transformers_lm.settings import Settings as TransformersSettings
from skills.prompted_skill.settings import Settings as SkillSettings

SETTINGS = {
    "agent": AgentSettings,
    "openai_api_lm": OpenAIApiSettings,
    "transformers_lm": TransformersSettings,
    "prompted_skill": SkillSettings,
    "autoscaler": AutoscalerSettings,
}
REQUIRED = {"openai_api_lm": {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "m"}}


def read_config(service: str, monkeypatch, **environ: str) -> dict:
    """The folder's gunicorn.conf.py as gunicorn reads it: executed as a file, its globals the settings."""
    monkeypatch.delenv("SERVICE_PORT", raising=False)
    for name, value in {**REQUIRED.get(service, {}), **environ}.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SERVICE_FOLDERS[service] / "gunicorn.conf.py"))


@pytest.mark.parametrize("service", SETTINGS)
def test_without_service_port_a_service_binds_the_default_its_settings_document(service, monkeypatch):
    config = read_config(service, monkeypatch)

    assert config["bind"] == f"0.0.0.0:{SETTINGS[service].model_fields['service_port'].default}"
    assert (config["workers"], config["worker_class"], config["threads"]) == (1, "common.gunicorn_worker.DrainingThreadWorker", 32)


def test_service_port_and_gunicorn_threads_come_from_the_services_settings(monkeypatch):
    config = read_config("agent", monkeypatch, SERVICE_PORT="9001", GUNICORN_THREADS="4", GUNICORN_TIMEOUT="30")

    assert (config["bind"], config["threads"], config["timeout"]) == ("0.0.0.0:9001", 4, 30)


def test_a_malformed_service_port_stops_plain_gunicorn_with_one_line_and_no_traceback():
    env = {**os.environ, "SERVICE_PORT": "80a"}

    result = subprocess.run(GUNICORN, cwd=SERVICE_FOLDERS["agent"], env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "cannot start" in line] == [
        line for line in result.stderr.splitlines() if line.strip()
    ], result.stderr
    assert "cannot start: SERVICE_PORT: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_plain_gunicorn_from_the_folder_serves_requests_at_the_same_time():
    # Given an LLM that answers only once two requests wait on it together
    both_waiting = threading.Barrier(2, timeout=20)

    def answers_when_both_wait(request):
        both_waiting.wait()  # breaks (a 500, then no hypothesis) if the skill serves one request at a time
        return Reply(200, [["Together."]])

    with recording_server(answers_when_both_wait) as llm:
        url = llm.url("/respond")
        env = {"GENERATIVE_SERVICE_URL": url, "LLM_ENDPOINTS": json.dumps({url: {"key_env_vars": []}}),
               "PYTHONPATH": ""}  # gunicorn.conf.py alone finds the repository's code
        with service_server("prompted_skill", env) as skill:
            # When two turns reach the skill at once
            dialog = {"utterances": [{"text": "Hi"}], "human_utterances": [{"text": "Hi"}]}
            answers: list = []
            turns = [threading.Thread(target=lambda: answers.append(
                requests.post(skill.url("/respond"), json={"dialogs": [dialog]}, timeout=30).json())) for _ in range(2)]
            for turn in turns:
                turn.start()
            for turn in turns:
                turn.join()
    # Then both were in flight together and both got the LLM's answer
    assert [answer[0][0] for answer in answers] == [["Together."], ["Together."]]

