"""A dialog end to end through `parley up`: the universal_prompted_assistant on free ports, on the
embedded SmolLM2, from the distribution's own compose files.

The test runs the distribution from a scratch checkout that links to this one, with one extra
overlay of its own (`test.yml`): a greedy, short generative config (so answers are reproducible and
quick on a busy CPU), roomy timeouts for the real model, and a second skill that hangs, to show
that a hanging skill costs a turn only its timeout. The model starts once for the module.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import sqlite3
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import requests

from parley.repo import Repo
from parley.up import run_distribution
from support.errors import assert_dream_error
from support.recording_server import recording_server
from support.servers import REPO_ROOT, running_server

pytestmark = pytest.mark.model

DIST = "universal_prompted_assistant"
SECRET = "sk-parley-up-secret-5e2b"
HANGING_SKILL_TIMEOUT = 3.0
# Generation on a shared 2-core machine can take tens of seconds: roomy, and not what is tested here.
TURN_TIMEOUT = 300
RUN = uuid.uuid4().hex[:8]  # user ids of this run, should the state outlive it
LINKED = ["services", "skills", "common", "components", "docker-compose.yml", ".env", "components.tsv"]

HANGING_SKILL_SERVER = textwrap.dedent(
    """
    import json, os, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer({"status": "ok"})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(60)  # far past the agent's timeout for this skill
            self._answer([["I hung.", 1.0, {}, {}, {}]])

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["SERVICE_PORT"])), Handler).serve_forever()
    """
)


def write_checkout(root: Path) -> Path:
    """A checkout whose code is this one's (links) and whose distribution folder has test.yml too."""
    root.mkdir(parents=True)
    for name in LINKED:
        (root / name).symlink_to(REPO_ROOT / name)
    dist = root / "assistant_dists" / DIST
    shutil.copytree(REPO_ROOT / "assistant_dists" / DIST, dist)

    greedy = dist / "greedy_generative_config.json"
    greedy.write_text(json.dumps({"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 24}))
    pipeline = json.loads((dist / "pipeline_conf.json").read_text())
    skills = pipeline["services"]["skills"]
    skills["prompted_skill"]["connector"]["timeout"] = TURN_TIMEOUT - 10
    skills["hanging_skill"] = {
        **skills["prompted_skill"],
        "connector": {"protocol": "http", "url": "http://hanging-skill:8199/respond", "timeout": HANGING_SKILL_TIMEOUT},
    }
    (dist / "pipeline_test.json").write_text(json.dumps(pipeline, indent=2))

    (root / "hanging_skill").mkdir()
    (root / "hanging_skill" / "server.py").write_text(HANGING_SKILL_SERVER)
    (root / "hanging_skill" / "Dockerfile").write_text(
        'FROM python:3.11-slim\nWORKDIR /app/hanging_skill\nCOPY hanging_skill /app/hanging_skill\n'
        'CMD ["python3", "server.py"]\n'
    )
    (dist / "test.yml").write_text(textwrap.dedent(f"""\
        services:
          agent:
            environment:
              PIPELINE_CONFIG: {dist / "pipeline_test.json"}
              RESPONSE_TIME_LIMIT: "{TURN_TIMEOUT}"
            depends_on:
              hanging-skill:
                condition: service_healthy
          prompted-skill:
            environment:
              GENERATIVE_SERVICE_CONFIG: {greedy}
              GENERATIVE_TIMEOUT: "{TURN_TIMEOUT - 20}"
          hanging-skill:
            build:
              context: .
              dockerfile: hanging_skill/Dockerfile
            environment:
              SERVICE_PORT: 8199
        """))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parley-up")


@pytest.fixture(scope="module")
def dist(workdir):
    checkout = write_checkout(workdir / "checkout")
    with run_distribution(Repo(checkout), DIST, free_ports=True, overlays=["cpu.yml", "test.yml"],
                          state_dir=workdir / "state", startup_timeout=600) as running:
        # Keep every output line from here on (parley up keeps only the last few per service).
        for service in running.services.values():
            service.lines = collections.deque()
        yield running


def say(url: str, user_id: str, payload: str, **fields) -> dict:
    response = requests.post(url + "/", json={"user_id": user_id, "payload": payload, **fields}, timeout=TURN_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def paris_dialog(dist):
    """Two turns of one user, the second carrying an API key; kept for the tests that read them back."""
    agent = dist.url("agent")
    return {
        "first": say(agent, f"ann-{RUN}", "What is the capital of France?"),
        "second": say(agent, f"ann-{RUN}", "Thank you!", OPENAI_API_KEY=SECRET),
    }


def test_the_capital_of_france_is_paris(paris_dialog):
    first = paris_dialog["first"]
    assert "Paris" in first["response"], first
    assert first["active_skill"] == "prompted_skill"
    assert [h["skill_name"] for h in first["debug_output"]] == ["prompted_skill"]  # the hanging skill was skipped


def test_a_skill_that_hangs_past_its_timeout_leaves_the_last_chance_answer_within_the_timeout(dist):
    with recording_server() as outsider:
        started = time.monotonic()
        # The prompted skill refuses this URL at once, so only the hanging skill is left to answer.
        answer = say(dist.url("agent"), f"eve-{RUN}", "Hello?", lm_service_url=outsider.url("/respond"))
        elapsed = time.monotonic() - started
    assert answer["active_skill"] == "last_chance_service"
    assert answer["response"].startswith("Sorry")
    assert elapsed < HANGING_SKILL_TIMEOUT + 5, elapsed  # the skill's timeout, not its 60 s hang
    assert outsider.connections == 0  # an lm_service_url outside the allowlist is never contacted


def output_through_now(dist, timeout_seconds: float = 30) -> str:
    """Every line the services have written so far. Each gunicorn service gets a marked GET /health and
    its access line is awaited: a process writes its lines in order, a request's own before its answer."""
    mark = f"log-mark-{uuid.uuid4().hex}"
    marked = [name for name in dist.services if name != "hanging-skill"]  # it logs no requests
    for name in marked:
        requests.get(f"{dist.url(name)}/health?{mark}", timeout=10)
    deadline = time.monotonic() + timeout_seconds
    while not all(any(mark in line for line in list(dist.services[name].lines)) for name in marked):
        assert time.monotonic() < deadline, f"not every service logged its request {mark}"
        time.sleep(0.05)
    return "\n".join(line for service in dist.services.values() for line in list(service.lines))


def test_a_key_sent_with_a_turn_is_in_no_log_line_and_no_stored_state(dist, paris_dialog):
    assert SECRET not in json.dumps(paris_dialog["second"])
    logs = output_through_now(dist)
    assert "POST /respond" in logs  # the services' output was captured
    assert SECRET not in logs
    state_db = Path(dist.services["agent"].plan.env["STATE_DB_PATH"])
    databases = [p for p in state_db.parent.iterdir() if p.name.startswith(state_db.name)]  # with -wal, -shm
    assert state_db in databases
    assert not any(SECRET.encode() in path.read_bytes() for path in databases)


def test_a_multi_turn_dialog_is_stored_and_survives_an_agent_restart(dist, paris_dialog):
    dialog_id = paris_dialog["first"]["dialog_id"]
    assert paris_dialog["second"]["dialog_id"] == dialog_id
    agent = dist.services["agent"]
    os.killpg(agent.process.pid, signal.SIGTERM)
    agent.process.wait(timeout=30)
    plan = agent.plan
    with running_server(plan.command, port=plan.port, cwd=plan.cwd, env=plan.env) as restarted:
        dialog = requests.get(restarted.url(f"/api/dialogs/{dialog_id}"), timeout=10).json()
        texts = [u["text"] for u in dialog["human_utterances"]]
        with sqlite3.connect(plan.env["STATE_DB_PATH"]) as db:
            stored_turns = db.execute("SELECT COUNT(*) FROM utterances WHERE dialog_id = ?", (dialog_id,)).fetchone()[0]
        # Bad input, against the restarted agent: a JSON error naming the field.
        for body, status, field in [
            ({"payload": "Hi"}, 400, "user_id"),
            ({"user_id": "ann", "payload": 42}, 400, "payload"),
            ({"user_id": "ann", "payload": "x" * 5000}, 413, "payload"),
        ]:
            assert_dream_error(requests.post(restarted.url("/"), json=body, timeout=10), status, field)
        not_json = requests.post(restarted.url("/"), data="Hi", headers={"Content-Type": "application/json"}, timeout=10)
        assert_dream_error(not_json, 400, None)
    assert texts == ["What is the capital of France?", "Thank you!"]
    assert dialog["bot_utterances"][0]["text"] == paris_dialog["first"]["response"]
    assert stored_turns == 4
