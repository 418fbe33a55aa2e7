"""The dialog state in SQL, shared by the SQLite and PostgreSQL stores: the schema, its migrations
and every query. A backend supplies connections, transactions and its dialect's row locks.

How a turn stays whole, once and in order when many threads (and, with PostgreSQL, many agent
processes) write at once: `append_turn` runs in one write transaction that first locks the
dialog's row (SQLite: the whole database, BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE),
then reads the last position and inserts the two utterances after it. A second writer of the same
dialog waits for the lock and so sees the first one's turn; `UNIQUE (dialog_id, position)` would
refuse a turn at a taken position rather than store two. The human utterance's id is the turn's
key: a turn handed in again (a retry after a lost connection) finds it and stores nothing.
`active_dialog` locks the user's row the same way, and a partial unique index keeps one active
dialog per user.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

from services.agent.store import DialogStore, new_id, now


class Db(Protocol):
    """One transaction's statements, with `?` placeholders whatever the driver's own style."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Mapping[str, Any] | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Mapping[str, Any]]: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> None: ...


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


# Applied in order, each once (schema_migrations records them). Never edit one that shipped: add the
# next. Every statement is idempotent, so a database made before migrations were recorded takes them.
MIGRATIONS = (
    Migration(1, "users, dialogs and utterances", (
        """CREATE TABLE IF NOT EXISTS users (
            user_external_id TEXT PRIMARY KEY,
            attributes TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS dialogs (
            dialog_id TEXT PRIMARY KEY,
            user_external_id TEXT NOT NULL REFERENCES users(user_external_id),
            active INTEGER NOT NULL DEFAULT 1,
            bot_attributes TEXT NOT NULL DEFAULT '{}',
            date_start TEXT NOT NULL,
            date_finish TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS dialogs_by_user ON dialogs(user_external_id, active)",
        """CREATE TABLE IF NOT EXISTS utterances (
            utt_id TEXT PRIMARY KEY,
            dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
            position INTEGER NOT NULL,
            user_type TEXT NOT NULL CHECK (user_type IN ('human', 'bot')),
            data TEXT NOT NULL,
            UNIQUE (dialog_id, position)
        )""",
    )),
    Migration(2, "at most one active dialog per user", (
        "CREATE UNIQUE INDEX IF NOT EXISTS one_active_dialog_per_user ON dialogs(user_external_id) WHERE active = 1",
    )),
)
MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


def apply_migrations(db: Db) -> list[int]:
    """Apply the migrations this database lacks, in order; the versions applied. The caller holds a
    lock that keeps a second process from migrating at the same time."""
    db.run(MIGRATIONS_TABLE)
    done = {row["version"] for row in db.all("SELECT version FROM schema_migrations")}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            db.run(statement)
        db.run("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
               (migration.version, migration.description, now()))
        applied.append(migration.version)
    return applied


class SqlDialogStore(DialogStore):
    """The queries of every SQL store; a backend gives `_write()`, `_read()` and its row-lock clause."""

    # Appended to a SELECT that must lock the rows it reads until the transaction ends.
    lock_clause: ClassVar[str] = ""

    @abstractmethod
    def _write(self) -> AbstractContextManager[Db]:
        """A write transaction (committed at the end of the block, rolled back on an exception)."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Db]:
        """A read transaction that sees one consistent snapshot."""

    def active_dialog(self, user_external_id: str, last_utterances: int | None = None) -> dict:
        with self._write() as db:
            stamp = now()
            db.run("INSERT INTO users (user_external_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (user_external_id, stamp))
            # Two turns of a new user at once (two agents) must not each create a dialog.
            db.one("SELECT user_external_id FROM users WHERE user_external_id = ?" + self.lock_clause, (user_external_id,))
            row = db.one("SELECT dialog_id FROM dialogs WHERE user_external_id = ? AND active = 1", (user_external_id,))
            if row is None:
                dialog_id = new_id()
                db.run("INSERT INTO dialogs (dialog_id, user_external_id, date_start, date_finish) VALUES (?, ?, ?, ?)",
                       (dialog_id, user_external_id, stamp, stamp))
            else:
                dialog_id = row["dialog_id"]
        dialog = self.dialog(dialog_id, last_utterances)
        assert dialog is not None  # dialogs are never deleted
        return dialog

    def close_active_dialog(self, user_external_id: str) -> None:
        with self._write() as db:
            db.run("UPDATE dialogs SET active = 0 WHERE user_external_id = ? AND active = 1", (user_external_id,))

    def append_turn(self, dialog_id: str, human_utterance: dict, bot_utterance: dict,
                    human_attributes: dict, bot_attributes: dict, human_attributes_reset_to: dict | None = None) -> None:
        with self._write() as db:
            # The dialog's row first: the lock that orders this dialog's turns across processes.
            dialog = db.one("SELECT user_external_id, bot_attributes FROM dialogs WHERE dialog_id = ?" + self.lock_clause,
                            (dialog_id,))
            if dialog is None:
                raise KeyError(f"no dialog {dialog_id!r}")
            if db.one("SELECT utt_id FROM utterances WHERE utt_id = ?", (human_utterance["utt_id"],)) is not None:
                return  # this turn is stored already (a retry)
            last = db.one("SELECT MAX(position) AS last_position FROM utterances WHERE dialog_id = ?", (dialog_id,))
            position = -1 if last is None or last["last_position"] is None else last["last_position"]
            for offset, (user_type, utterance) in enumerate((("human", human_utterance), ("bot", bot_utterance)), 1):
                db.run("INSERT INTO utterances (utt_id, dialog_id, position, user_type, data) VALUES (?, ?, ?, ?, ?)",
                       (utterance["utt_id"], dialog_id, position + offset, user_type, json.dumps(utterance)))
            if human_attributes or human_attributes_reset_to is not None:
                user = db.one("SELECT attributes FROM users WHERE user_external_id = ?" + self.lock_clause,
                              (dialog["user_external_id"],))
                assert user is not None
                base = json.loads(user["attributes"]) if human_attributes_reset_to is None else human_attributes_reset_to
                merged = {**base, **human_attributes}
                db.run("UPDATE users SET attributes = ? WHERE user_external_id = ?",
                       (json.dumps(merged), dialog["user_external_id"]))
            merged_bot = {**json.loads(dialog["bot_attributes"]), **bot_attributes}
            db.run("UPDATE dialogs SET date_finish = ?, bot_attributes = ? WHERE dialog_id = ?",
                   (bot_utterance["date_time"], json.dumps(merged_bot), dialog_id))

    def dialog(self, dialog_id: str, last_utterances: int | None = None) -> dict | None:
        with self._read() as db:
            row = db.one(
                "SELECT d.dialog_id, d.user_external_id, d.active, d.bot_attributes, d.date_start, d.date_finish, "
                "u.attributes AS human_attributes FROM dialogs d JOIN users u ON u.user_external_id = d.user_external_id "
                "WHERE d.dialog_id = ?", (dialog_id,))
            if row is None:
                return None
            query = "SELECT data FROM utterances WHERE dialog_id = ? ORDER BY position DESC"
            params: tuple = (dialog_id,)
            if last_utterances is not None:
                query, params = query + " LIMIT ?", (dialog_id, last_utterances)
            utterances = [json.loads(r["data"]) for r in db.all(query, params)][::-1]
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
        with self._read() as db:
            # A dialog closed and the next opened within one millisecond share date_start: the closed
            # one is the older (a user has one active dialog, always the newest).
            rows = db.all("SELECT dialog_id FROM dialogs WHERE user_external_id = ? ORDER BY date_start, active, dialog_id",
                          (user_external_id,))
        return [r["dialog_id"] for r in rows]
