"""Agents sharing one PostgreSQL: two real agent processes (gunicorn on loopback) on one real
database (tests/support/postgres.py) take alternate turns of the same dialogs while 16 users talk
at once, and every turn is stored once, in order, with its own answer.

The skill is a recording server of ours that echoes the user's text (the point is the agents'
state, not the answer); tests/test_soak.py runs the real skill and model on PostgreSQL.
The counts are written to tests/output/shared-state.json and printed as one summary line.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import psycopg
import requests

from support.recording_server import Reply, recording_server
from support.servers import GUNICORN, REPO_ROOT, SERVICE_FOLDERS, free_port, service_server

DIST_PIPELINE = REPO_ROOT / "assistant_dists/universal_prompted_assistant/pipeline_conf.json"
USERS = 16
TURNS = 12
OUTPUT = REPO_ROOT / "tests" / "output" / "shared-state.json"


def echo_skill(request) -> Reply:
    """Dream's skill answer: one hypothesis, "echo: <the user's last text>"."""
    dialog = request.json()["dialogs"][0]
    text = dialog["human_utterances"][-1]["text"]
    return Reply(200, [[[f"echo: {text}"], [0.9], [{}], [{}], [{}]]])


def agent_process(tmp_path, name: str, skill_url: str, state_url: str):
    pipeline = json.loads(DIST_PIPELINE.read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"].update(url=skill_url, timeout=30)
    path = tmp_path / f"pipeline-{name}.json"
    path.write_text(json.dumps(pipeline))
    env = {"SERVICE_NAME": name, "PIPELINE_CONFIG": str(path), "STATE_URL": state_url, "STATE_POOL_SIZE": "8"}
    return service_server("agent", env, startup_timeout_seconds=60)


def test_two_agents_taking_alternate_turns_of_16_users_dialogs_store_every_turn_once_in_order(tmp_path, postgres):
    state_url = postgres.create_database()
    with recording_server(echo_skill) as skill, \
            agent_process(tmp_path, "agent-a", skill.url("/respond"), state_url) as first, \
            agent_process(tmp_path, "agent-b", skill.url("/respond"), state_url) as second:
        agents = (first, second)

        def talk(user: int) -> list[dict]:
            acknowledged = []
            with requests.Session() as session:
                for turn in range(TURNS):
                    agent = agents[(user + turn) % 2]  # every turn goes to the other agent
                    text = f"user {user} turn {turn}"
                    answer = session.post(agent.url("/"), json={"user_id": f"user-{user}", "payload": text}, timeout=60)
                    assert answer.status_code == 200, answer.text
                    acknowledged.append({"text": text, **answer.json()})
            return acknowledged

        with ThreadPoolExecutor(max_workers=USERS) as pool:
            conversations = list(pool.map(talk, range(USERS)))
        stored = {user: requests.get(agents[user % 2].url(f"/api/dialogs/{turns[0]['dialog_id']}"), timeout=30).json()
                  for user, turns in enumerate(conversations)}

    lost = duplicated = reordered = 0
    mixed_up: list[str] = []  # which user's answers are not their own turns' (at most a few, for the report)
    for user, turns in enumerate(conversations):
        assert len({turn["dialog_id"] for turn in turns}) == 1, f"user {user} got more than one dialog"
        utterances = stored[user]["utterances"]
        humans = [u["text"] for u in utterances if u["user"]["user_type"] == "human"]
        expected = [turn["text"] for turn in turns]
        lost += sum(1 for text in expected if text not in humans)
        duplicated += len(humans) - len(set(humans))
        reordered += humans != [text for text in expected if text in humans]
        types = [u["user"]["user_type"] for u in utterances]
        bot_ids = [u["utt_id"] for u in utterances if u["user"]["user_type"] == "bot"]
        if types != ["human", "bot"] * (len(utterances) // 2) or bot_ids != [t["utt_id"] for t in turns]:
            mixed_up.append(f"user {user}: stored turns {types}, answer ids in another order than acknowledged")
        mixed_up += [f"user {user}: {h['text']!r} answered {u['text']!r} by {u.get('active_skill')}"
                     for h, u in zip(utterances[::2], utterances[1::2], strict=True) if u["text"] != f"echo: {h['text']}"]
    answers_mixed_up = len(mixed_up)
    with psycopg.connect(state_url) as db:
        rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT (dialog_id, position)), COUNT(DISTINCT dialog_id) FROM utterances").fetchone()
        gaps = db.execute("SELECT COUNT(*) FROM (SELECT dialog_id FROM utterances GROUP BY dialog_id "
                          "HAVING MIN(position) <> 0 OR MAX(position) <> COUNT(*) - 1) AS holed").fetchone()[0]

    report = {"agents": 2, "users": USERS, "turns": USERS * TURNS, "stored_utterances": rows[0], "dialogs": rows[2],
              "lost": lost, "duplicated": duplicated, "reordered": reordered, "answers_mixed_up": answers_mixed_up, "mixed_up": mixed_up[:5],
              "position_gaps": gaps}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2))
    print(f"\nshared state: 2 agents on PostgreSQL, {USERS} users, {USERS * TURNS} turns, "
          f"lost: {lost}, duplicated: {duplicated}, reordered: {reordered}")
    assert (lost, duplicated, reordered, answers_mixed_up, gaps) == (0, 0, 0, 0, 0), report
    assert rows == (USERS * TURNS * 2, USERS * TURNS * 2, USERS)


def test_an_agent_whose_database_refuses_its_password_stops_with_one_line_that_hides_it(tmp_path, postgres):
    wrong = postgres.create_database().replace(":parley-test-password@", ":wrong-password-1234@")
    env = {**os.environ, "SERVICE_PORT": str(free_port()), "STATE_URL": wrong, "STATE_CONNECT_TIMEOUT": "5"}

    result = subprocess.run(GUNICORN, cwd=SERVICE_FOLDERS["agent"], env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    complaints = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(complaints) == 1 and "cannot start: STATE_URL: postgresql://parley:***@127.0.0.1:" in complaints[0], result.stderr
    assert "password authentication failed" in complaints[0]
    assert "wrong-password-1234" not in result.stderr + result.stdout and "Traceback" not in result.stderr
