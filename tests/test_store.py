"""The dialog store's contract, run against both backends: SQLite (a file in tmp_path) and
PostgreSQL (a real server started for the session, tests/support/postgres.py, a new database per
test). In-process: the stores are called directly, several threads and store objects at once
standing in for request threads and agent processes; tests/test_agent_shared_state.py runs real
agent processes on one PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.agent.store import DialogStore, StoreError, new_id, now, open_store, redact_url
from services.agent.store.sql import MIGRATIONS


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'dialogs.sqlite3'}"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def store(state_url):
    opened = open_store(state_url)
    yield opened
    opened.close()


def utterance(text: str, user_type: str) -> dict:
    return {"utt_id": new_id(), "text": text, "user": {"user_type": user_type}, "annotations": {},
            "attributes": {}, "date_time": now(), **({"hypotheses": []} if user_type == "human" else {})}


def add_turn(store: DialogStore, dialog_id: str, text: str, human_attributes: dict | None = None,
             bot_attributes: dict | None = None) -> tuple[dict, dict]:
    human, bot = utterance(text, "human"), utterance(f"answer to {text}", "bot")
    store.append_turn(dialog_id, human, bot, human_attributes or {}, bot_attributes or {})
    return human, bot


def texts(dialog: dict) -> list[str]:
    return [u["text"] for u in dialog["utterances"]]


def test_a_new_user_gets_one_active_dialog_that_stays_theirs(store):
    first = store.active_dialog("ann")
    again = store.active_dialog("ann")

    assert first["dialog_id"] == again["dialog_id"]
    assert first["utterances"] == [] and first["human"]["user_external_id"] == "ann" and first["_active"]
    assert store.dialog_ids_of("ann") == [first["dialog_id"]]


def test_a_turn_is_stored_as_the_human_utterance_then_the_bots_answer(store):
    dialog_id = store.active_dialog("ann")["dialog_id"]
    add_turn(store, dialog_id, "one")
    add_turn(store, dialog_id, "two")

    dialog = store.dialog(dialog_id)

    assert texts(dialog) == ["one", "answer to one", "two", "answer to two"]
    assert [u["text"] for u in dialog["human_utterances"]] == ["one", "two"]
    assert [u["text"] for u in dialog["bot_utterances"]] == ["answer to one", "answer to two"]


def test_last_utterances_gives_only_the_latest_ones_oldest_first(store):
    dialog_id = store.active_dialog("ann")["dialog_id"]
    for text in ("one", "two", "three"):
        add_turn(store, dialog_id, text)

    assert texts(store.active_dialog("ann", last_utterances=3)) == ["answer to two", "three", "answer to three"]


def test_a_turn_handed_in_twice_is_stored_once(store):
    dialog_id = store.active_dialog("ann")["dialog_id"]
    human, bot = add_turn(store, dialog_id, "one")

    store.append_turn(dialog_id, human, bot, {}, {})

    assert texts(store.dialog(dialog_id)) == ["one", "answer to one"]


def test_closing_the_dialog_makes_the_next_turn_start_a_new_one(store):
    first = store.active_dialog("ann")["dialog_id"]
    add_turn(store, first, "one")

    store.close_active_dialog("ann")
    second = store.active_dialog("ann")

    assert second["dialog_id"] != first and second["utterances"] == []
    assert store.dialog(first)["_active"] is False
    assert store.dialog_ids_of("ann") == [first, second["dialog_id"]]


def test_attributes_of_the_user_and_the_bot_are_merged_turn_by_turn(store):
    dialog_id = store.active_dialog("ann")["dialog_id"]
    add_turn(store, dialog_id, "one", {"name": "Ann"}, {"topic": "weather"})
    add_turn(store, dialog_id, "two", {"city": "Paris"}, {"topic": "travel"})

    dialog = store.dialog(dialog_id)

    assert dialog["human"]["attributes"] == {"name": "Ann", "city": "Paris"}
    assert dialog["bot"]["attributes"] == {"topic": "travel"}


def test_an_unknown_dialog_is_none(store):
    assert store.dialog("no-such-dialog") is None


def test_two_stores_writing_one_dialog_at_once_store_every_turn_once_in_order(state_url):
    """Two store objects (two agent processes) and 8 threads append 20 turns each to one dialog."""
    stores = [open_store(state_url), open_store(state_url)]
    dialog_id = stores[0].active_dialog("shared")["dialog_id"]
    writers, turns = 8, 20

    def write(writer: int) -> None:
        for turn in range(turns):
            add_turn(stores[(writer + turn) % 2], dialog_id, f"w{writer} t{turn}")

    try:
        with ThreadPoolExecutor(max_workers=writers) as pool:
            list(pool.map(write, range(writers)))
        utterances = stores[1].dialog(dialog_id)["utterances"]
    finally:
        for opened in stores:
            opened.close()

    assert len(utterances) == 2 * writers * turns
    pairs = [(utterances[i], utterances[i + 1]) for i in range(0, len(utterances), 2)]
    assert all(h["user"]["user_type"] == "human" and b["text"] == f"answer to {h['text']}" for h, b in pairs)
    humans = [h["text"] for h, _ in pairs]
    assert len(set(humans)) == len(humans)
    for writer in range(writers):  # each writer's turns in the order it wrote them
        assert [t for t in humans if t.startswith(f"w{writer} ")] == [f"w{writer} t{turn}" for turn in range(turns)]


def test_a_new_users_first_turns_through_two_stores_at_once_share_one_dialog(state_url):
    stores = [open_store(state_url), open_store(state_url)]
    barrier = threading.Barrier(8)

    def first_turn(index: int) -> str:
        barrier.wait()
        return stores[index % 2].active_dialog("newcomer")["dialog_id"]

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            dialog_ids = set(pool.map(first_turn, range(8)))
        assert len(dialog_ids) == 1
        assert stores[0].dialog_ids_of("newcomer") == list(dialog_ids)
    finally:
        for opened in stores:
            opened.close()


def test_agents_starting_at_once_apply_each_migration_once(state_url):
    barrier = threading.Barrier(4)

    def start(_: int) -> DialogStore:
        barrier.wait()
        return open_store(state_url)

    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(start, range(4)))
    try:
        with stores[0]._read() as db:
            versions = [row["version"] for row in db.all("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        for opened in stores:
            opened.close()
    assert versions == [migration.version for migration in MIGRATIONS]


def test_a_sqlite_file_made_before_migrations_keeps_its_dialogs(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema as the agent created it before schema_migrations
        db.executescript("""
            CREATE TABLE users (user_external_id TEXT PRIMARY KEY, attributes TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
            CREATE TABLE dialogs (dialog_id TEXT PRIMARY KEY, user_external_id TEXT NOT NULL REFERENCES users(user_external_id),
                active INTEGER NOT NULL DEFAULT 1, bot_attributes TEXT NOT NULL DEFAULT '{}', date_start TEXT NOT NULL, date_finish TEXT NOT NULL);
            CREATE INDEX dialogs_by_user ON dialogs(user_external_id, active);
            CREATE TABLE utterances (utt_id TEXT PRIMARY KEY, dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
                position INTEGER NOT NULL, user_type TEXT NOT NULL CHECK (user_type IN ('human', 'bot')), data TEXT NOT NULL,
                UNIQUE (dialog_id, position));
            INSERT INTO users VALUES ('ann', '{}', '2026-01-01T00:00:00.000+00:00');
            INSERT INTO dialogs VALUES ('d1', 'ann', 1, '{}', '2026-01-01T00:00:00.000+00:00', '2026-01-01T00:00:00.000+00:00');
            INSERT INTO utterances VALUES ('u1', 'd1', 0, 'human', '{"utt_id": "u1", "text": "old", "user": {"user_type": "human"}}');
        """)

    store = open_store(f"sqlite:///{path}")
    try:
        assert texts(store.active_dialog("ann")) == ["old"]
    finally:
        store.close()


def test_an_unknown_scheme_is_refused_naming_state_url():
    with pytest.raises(StoreError, match=r"STATE_URL: unknown scheme mysql:// .*sqlite://"):
        open_store("mysql://root:secret@db/parley")


def test_a_wrong_password_is_refused_without_showing_it(postgres):
    wrong = postgres.url().replace(":parley-test-password@", ":not-the-password@")

    with pytest.raises(StoreError) as refused:
        open_store(wrong, connect_timeout=5)

    assert "STATE_URL" in str(refused.value) and "password authentication failed" in str(refused.value)
    assert "not-the-password" not in str(refused.value)


def test_redact_url_hides_only_the_password():
    assert redact_url("postgresql://parley:s3cret@db:5432/parley") == "postgresql://parley:***@db:5432/parley"
    assert redact_url("sqlite:////var/lib/parley/dialogs.sqlite3") == "sqlite:////var/lib/parley/dialogs.sqlite3"
