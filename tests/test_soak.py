"""Dialog soak: 16 users talk at once through the agent (real gunicorn processes on loopback, the tiny
model), every turn stored once, in order, with its answer; then the agent is SIGKILLed mid-run and
restarted, every acknowledged turn is still there and the users go on. Run on each state backend:
the SQLite file, and a real PostgreSQL server (tests/support/postgres.py).

Turns/s and p95 latency are written to tests/output/soak-<backend>.json (measurements, not asserts).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
from support.servers import REPO_ROOT, free_port
from support.tiny_stack import agent_service

USERS = 16
TURNS = 20
TURNS_AFTER_KILL = 8
OUTPUT_DIR = REPO_ROOT / "tests" / "output"


@dataclass
class User:
    user_id: str
    acknowledged: list[dict] = field(default_factory=list)  # {"text", "answer", "utt_id", "dialog_id"}
    latencies: list[float] = field(default_factory=list)


def say(session: requests.Session, url: str, user: User, text: str) -> None:
    started = time.monotonic()
    answer = session.post(url, json={"user_id": user.user_id, "payload": text}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    user.latencies.append(time.monotonic() - started)
    user.acknowledged.append({"text": text, "answer": body["response"], "utt_id": body["utt_id"],
                              "dialog_id": body["dialog_id"]})


def talk(url: str, user: User, turns: range) -> None:
    with requests.Session() as session:
        for turn in turns:
            say(session, url, user, f"{user.user_id} turn {turn}: how are you?")


def talk_through_a_crash(url: str, user: User, turns: range, stop: threading.Event) -> None:
    """Each turn is retried (with a new text) until the agent acknowledges it: the agent may be down."""
    with requests.Session() as session:
        for turn in turns:
            for attempt in range(600):
                if stop.is_set():
                    return
                try:
                    say(session, url, user, f"{user.user_id} turn {turn} attempt {attempt}: and now?")
                    break
                except (requests.RequestException, AssertionError):
                    time.sleep(0.1)


def stored_dialog(base_url: str, dialog_id: str) -> dict:
    answer = requests.get(f"{base_url}/api/dialogs/{dialog_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_stored_once_in_order(base_url: str, user: User, exactly: bool) -> None:
    """The user's acknowledged turns are in their dialog once each, in order, each with its answer."""
    dialog_ids = {turn["dialog_id"] for turn in user.acknowledged}
    assert len(dialog_ids) == 1, dialog_ids
    utterances = stored_dialog(base_url, dialog_ids.pop())["utterances"]
    pairs = [(utterances[i], utterances[i + 1]) for i in range(0, len(utterances) - 1, 2)]
    assert all(h["user"]["user_type"] == "human" and b["user"]["user_type"] == "bot" for h, b in pairs)
    stored = [(h["text"], b["text"], b["utt_id"]) for h, b in pairs]
    expected = [(t["text"], t["answer"], t["utt_id"]) for t in user.acknowledged]
    if exactly:
        assert len(utterances) == 2 * len(expected)
        assert stored == expected
    else:  # a turn the agent stored but was killed before acknowledging may sit between them
        lost = [turn for turn in expected if turn not in stored]
        assert not lost, f"acknowledged but not stored: {lost}"
        positions = [stored.index(turn) for turn in expected]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        texts = [text for text, _, _ in stored]
        assert len(texts) == len(set(texts)), "a turn was stored twice"


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


@pytest.fixture(params=["sqlite", "postgresql"])
def state_env(request) -> dict[str, str]:
    """The agent's STATE_URL: unset (the SQLite file STATE_DB_PATH) or a new PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"STATE_URL": request.getfixturevalue("postgres").create_database()}


def test_concurrent_users_turns_survive_a_sigkill_of_the_agent(tmp_path, tiny_skill, state_env):
    state_db = tmp_path / "state.sqlite3"
    backend = "postgresql" if state_env else "sqlite"
    port = free_port()
    users = [User(f"soak-user-{index:02d}") for index in range(USERS)]
    with agent_service(tmp_path, tiny_skill, state_db, port=port, **state_env) as agent:
        # 16 users x 20 turns at once.
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=USERS) as pool:
            for future in [pool.submit(talk, agent.url("/"), user, range(TURNS)) for user in users]:
                future.result()
        elapsed = time.monotonic() - started
        for user in users:
            assert len(user.acknowledged) == TURNS
            assert_stored_once_in_order(agent.base_url, user, exactly=True)
        latencies = [latency for user in users for latency in user.latencies]

        # The users go on; the agent is killed (SIGKILL, master and worker) while they talk.
        acknowledged_before = sum(len(user.acknowledged) for user in users)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=USERS)
        futures = [pool.submit(talk_through_a_crash, agent.url("/"), user, range(TURNS, TURNS + TURNS_AFTER_KILL), stop)
                   for user in users]
        deadline = time.monotonic() + 120
        while sum(len(u.acknowledged) for u in users) < acknowledged_before + USERS * 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(agent.process.pid, signal.SIGKILL)
        agent.process.wait(timeout=30)
        acknowledged_at_kill = {user.user_id: list(user.acknowledged) for user in users}
    try:
        with agent_service(tmp_path, tiny_skill, state_db, port=port, **state_env) as restarted:
            for future in futures:
                future.result(timeout=300)
            for user in users:
                assert len(user.acknowledged) == TURNS + TURNS_AFTER_KILL
                assert_stored_once_in_order(restarted.base_url, user, exactly=False)
    finally:
        stop.set()
        pool.shutdown(wait=True)

    report = {
        "state": backend, "users": USERS, "turns_per_user": TURNS, "turns": USERS * TURNS, "seconds": round(elapsed, 2),
        "turns_per_second": round(USERS * TURNS / elapsed, 2), "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(p95(latencies), 3), "acknowledged_before_kill": sum(map(len, acknowledged_at_kill.values())),
        "load_average_1min": os.getloadavg()[0],
    }
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / f"soak-{backend}.json").write_text(json.dumps(report, indent=2))
    print("soak:", report)
