"""The dialog state in PostgreSQL (`postgresql://USER:PASSWORD@HOST:PORT/DB`): one database that
any number of agent processes share, so the agent can run as several replicas.

psycopg 3 with a connection pool (psycopg_pool; STATE_POOL_SIZE connections at most per process,
each checked before it is lent, so a restarted server costs no request). The tables are the SQLite
store's (services/agent/store/sql.py). Opening waits up to STATE_CONNECT_TIMEOUT seconds for the
server (a swarm starts the agent and the database in any order), then applies the migrations under
an advisory lock, so two agents starting at once migrate one after the other. A write transaction
locks the dialog's row (or the user's) with SELECT ... FOR UPDATE: two agents taking turns of one
dialog queue on that row, and each stores its turn after the other's.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from services.agent.store import StoreError, redact_url, register_store
from services.agent.store.sql import SqlDialogStore, apply_migrations

logger = logging.getLogger(__name__)
# pg_advisory_xact_lock key held while migrating: "parleyst" as a big-endian 64-bit integer.
MIGRATION_LOCK = int.from_bytes(b"parleyst", "big")
# Refusals that waiting does not cure: reported at once instead of after STATE_CONNECT_TIMEOUT.
FINAL_REFUSALS = ("password authentication failed", "does not exist", "no pg_hba.conf entry")


def wait_for_server(url: str, timeout: float) -> None:
    """Return once the server takes a connection; StoreError when it refuses for good or the time is up."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=max(1, min(10, int(timeout)))).close()
            return
        except psycopg.OperationalError as error:
            reason = " ".join(str(error).split())
            if any(refusal in reason for refusal in FINAL_REFUSALS):
                raise StoreError(f"STATE_URL: {redact_url(url)}: {reason}") from None
            if time.monotonic() >= deadline:
                raise StoreError(f"STATE_URL: no connection to {redact_url(url)} within {timeout:g}s "
                                 f"(STATE_CONNECT_TIMEOUT): {reason}") from None
            logger.info("dialog state: waiting for %s (%s)", redact_url(url), reason)
            time.sleep(1)


class _Db:
    def __init__(self, connection: Any):
        self.connection = connection

    def one(self, sql: str, params: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return self.connection.execute(sql.replace("?", "%s"), params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return self.connection.execute(sql.replace("?", "%s"), params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.connection.execute(sql.replace("?", "%s"), params)


@register_store
class PostgresDialogStore(SqlDialogStore):
    """A pool of autocommit connections; each block of work is one explicit transaction."""

    schemes = ("postgresql", "postgres")
    shared = True
    lock_clause = " FOR UPDATE"

    def __init__(self, url: str, pool: Any):
        self.url = url
        self.pool = pool

    @classmethod
    def open(cls, url: str, *, pool_size: int = 10, connect_timeout: float = 60.0) -> "PostgresDialogStore":
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError:
            raise StoreError("STATE_URL is postgresql://, but psycopg is not installed: pip install 'psycopg[binary,pool]'") from None
        wait_for_server(url, connect_timeout)
        pool = ConnectionPool(
            conninfo=url, min_size=1, max_size=pool_size, open=False, name="agent-state",
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 10},
            check=ConnectionPool.check_connection, timeout=30,
        )
        try:
            pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            pool.close()
            raise StoreError(f"STATE_URL: no connection to {redact_url(url)} within {connect_timeout:g}s "
                             "(STATE_CONNECT_TIMEOUT): is the server up, and are the user, password and database right?") from None
        except psycopg.Error as error:
            pool.close()
            raise StoreError(f"STATE_URL: {redact_url(url)}: {str(error).strip()}") from None
        store = cls(url, pool)
        try:
            with pool.connection() as connection, connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                applied = apply_migrations(_Db(connection))
        except psycopg.Error as error:
            pool.close()
            raise StoreError(f"STATE_URL: {redact_url(url)}: applying the schema failed: {str(error).strip()}") from None
        if applied:
            logger.info("dialog state: applied migrations %s to %s", applied, redact_url(url))
        return store

    @contextmanager
    def _write(self) -> Iterator[_Db]:
        with self.pool.connection() as connection, connection.transaction():
            yield _Db(connection)

    @contextmanager
    def _read(self) -> Iterator[_Db]:
        with self.pool.connection() as connection, connection.transaction():
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _Db(connection)

    def describe(self) -> str:
        return f"PostgreSQL {redact_url(self.url)} (pool of {self.pool.max_size})"

    def close(self) -> None:
        self.pool.close()
