"""The dialog state in one SQLite file (`sqlite:///PATH`): the default, for one agent process.

WAL mode, so readers never block the writer and the request threads share one file, each with its
own connection. A write transaction is BEGIN IMMEDIATE: it takes the database's write lock at once,
so writers queue and each sees the turns committed before it (synchronous=NORMAL with WAL: a
committed turn survives a crash of the process). A path in the URL follows SQLAlchemy's rule:
`sqlite:///state.db` is relative (to the repository root), `sqlite:////var/lib/x.db` absolute.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from common.settings_support import resolve_repo_path
from services.agent.store import StoreError, register_store
from services.agent.store.sql import SqlDialogStore, apply_migrations

PREFIX = "sqlite:///"


def sqlite_url(path: Path) -> str:
    """The STATE_URL of a SQLite file (an absolute path gets the fourth slash)."""
    return PREFIX + str(path)


def path_of(url: str) -> Path:
    if not url.lower().startswith(PREFIX):
        raise StoreError(f"STATE_URL: a SQLite URL is sqlite:///PATH (three slashes, then the path), not {url!r}")
    path = url[len(PREFIX):].split("?", 1)[0]
    if not path:
        raise StoreError("STATE_URL: sqlite:/// needs a file path, e.g. sqlite:////var/lib/parley/agent/dialogs.sqlite3")
    return resolve_repo_path(path)


class _Db:
    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def one(self, sql: str, params: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return self.connection.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return self.connection.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.connection.execute(sql, params)


@register_store
class SqliteDialogStore(SqlDialogStore):
    """One SQLite connection per thread; writers serialised by the database's write lock."""

    schemes = ("sqlite",)
    shared = False

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, *, pool_size: int = 10, connect_timeout: float = 60.0) -> "SqliteDialogStore":
        store = cls(path_of(url))
        try:
            store.path.parent.mkdir(parents=True, exist_ok=True)
            with store._write() as db:
                apply_migrations(db)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"STATE_URL: cannot open the SQLite file {store.path}: {error}") from None
        return store

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _write(self) -> Iterator[_Db]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield _Db(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[_Db]:
        connection = self._connection()
        connection.execute("BEGIN")  # one snapshot for every statement of the block
        try:
            yield _Db(connection)
        finally:
            connection.execute("COMMIT")

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()
