"""The dialog state in SQLite: users, dialogs, and utterances with their annotations and hypotheses.

WAL mode, so readers never block the writer and several gunicorn workers share one file. A turn (the
user's utterance and the bot's answer) is written in one IMMEDIATE transaction at the end of the
turn, so each turn is stored once, whole, in order, whatever other users do at the same time; a
process killed mid-turn leaves no half turn behind.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from contextlib import contextmanager

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_external_id TEXT PRIMARY KEY,
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dialogs (
    dialog_id TEXT PRIMARY KEY,
    user_external_id TEXT NOT NULL REFERENCES users(user_external_id),
    active INTEGER NOT NULL DEFAULT 1,
    bot_attributes TEXT NOT NULL DEFAULT '{}',
    date_start TEXT NOT NULL,
    date_finish TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dialogs_by_user ON dialogs(user_external_id, active);
CREATE TABLE IF NOT EXISTS utterances (
    utt_id TEXT PRIMARY KEY,
    dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
    position INTEGER NOT NULL,
    user_type TEXT NOT NULL CHECK (user_type IN ('human', 'bot')),
    data TEXT NOT NULL,
    UNIQUE (dialog_id, position)
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


class DialogStore:
    """All reads and writes of the state; one SQLite connection per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript commits on its own; every statement is idempotent (IF NOT EXISTS).
        self._connection().executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a crash of the process
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def active_dialog(self, user_external_id: str, last_utterances: int | None = None) -> dict:
        """The user's active dialog as Dream's dict (created with the user if there is none).

        With `last_utterances`, only that many of the latest utterances: what a turn's services see.
        """
        with self._transaction() as db:
            stamp = now()
            db.execute(
                "INSERT OR IGNORE INTO users (user_external_id, created_at) VALUES (?, ?)", (user_external_id, stamp)
            )
            row = db.execute(
                "SELECT dialog_id FROM dialogs WHERE user_external_id = ? AND active = 1", (user_external_id,)
            ).fetchone()
            if row is None:
                dialog_id = new_id()
                db.execute(
                    "INSERT INTO dialogs (dialog_id, user_external_id, date_start, date_finish) VALUES (?, ?, ?, ?)",
                    (dialog_id, user_external_id, stamp, stamp),
                )
            else:
                dialog_id = row["dialog_id"]
        return self.dialog(dialog_id, last_utterances)

    def close_active_dialog(self, user_external_id: str) -> None:
        """Dream's /start and /close: the user's next turn starts a new dialog."""
        with self._transaction() as db:
            db.execute("UPDATE dialogs SET active = 0 WHERE user_external_id = ? AND active = 1", (user_external_id,))

    def append_turn(self, dialog_id: str, human_utterance: dict, bot_utterance: dict,
                    human_attributes: dict, bot_attributes: dict, human_attributes_reset_to: dict | None = None) -> None:
        """Store the user's utterance and the bot's answer at the end of the dialog, together; the
        user's attributes get `human_attributes` merged over them (over `human_attributes_reset_to`
        instead, when the turn reset them)."""
        with self._transaction() as db:
            last = db.execute("SELECT MAX(position) FROM utterances WHERE dialog_id = ?", (dialog_id,)).fetchone()[0]
            position = -1 if last is None else last
            for offset, (user_type, utterance) in enumerate((("human", human_utterance), ("bot", bot_utterance)), 1):
                db.execute(
                    "INSERT INTO utterances (utt_id, dialog_id, position, user_type, data) VALUES (?, ?, ?, ?, ?)",
                    (utterance["utt_id"], dialog_id, position + offset, user_type, json.dumps(utterance)),
                )
            user = db.execute(
                "SELECT u.user_external_id, u.attributes FROM users u JOIN dialogs d USING (user_external_id) "
                "WHERE d.dialog_id = ?", (dialog_id,)
            ).fetchone()
            if human_attributes or human_attributes_reset_to is not None:
                base = json.loads(user["attributes"]) if human_attributes_reset_to is None else human_attributes_reset_to
                merged = {**base, **human_attributes}
                db.execute("UPDATE users SET attributes = ? WHERE user_external_id = ?",
                           (json.dumps(merged), user["user_external_id"]))
            row = db.execute("SELECT bot_attributes FROM dialogs WHERE dialog_id = ?", (dialog_id,)).fetchone()
            merged_bot = {**json.loads(row["bot_attributes"]), **bot_attributes}
            db.execute("UPDATE dialogs SET date_finish = ?, bot_attributes = ? WHERE dialog_id = ?",
                       (bot_utterance["date_time"], json.dumps(merged_bot), dialog_id))

    def dialog(self, dialog_id: str, last_utterances: int | None = None) -> dict | None:
        """A dialog as Dream's dict: utterances (and human/bot ones) oldest first, the human, the bot.

        With `last_utterances`, only that many of the latest utterances.
        """
        db = self._connection()
        # One read transaction, so the dialog and its utterances are one consistent snapshot.
        db.execute("BEGIN")
        try:
            row = db.execute(
                "SELECT d.*, u.attributes AS human_attributes FROM dialogs d JOIN users u USING (user_external_id) "
                "WHERE d.dialog_id = ?", (dialog_id,)
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT data FROM utterances WHERE dialog_id = ? ORDER BY position DESC LIMIT ?",
                (dialog_id, -1 if last_utterances is None else last_utterances),
            )
            utterances = [json.loads(r["data"]) for r in rows][::-1]
        finally:
            db.execute("COMMIT")
        return {
            "dialog_id": row["dialog_id"],
            "utterances": utterances,
            "human_utterances": [u for u in utterances if u["user"]["user_type"] == "human"],
            "bot_utterances": [u for u in utterances if u["user"]["user_type"] == "bot"],
            "human": {"user_external_id": row["user_external_id"], "user_type": "human",
                      "attributes": json.loads(row["human_attributes"])},
            "bot": {"user_type": "bot", "attributes": json.loads(row["bot_attributes"])},
            "channel_type": "http_client",
            "date_start": row["date_start"],
            "date_finish": row["date_finish"],
            "_active": bool(row["active"]),
            "attributes": {},
        }

    def dialog_ids_of(self, user_external_id: str) -> list[str]:
        rows = self._connection().execute(
            "SELECT dialog_id FROM dialogs WHERE user_external_id = ? ORDER BY date_start", (user_external_id,)
        )
        return [r["dialog_id"] for r in rows]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
