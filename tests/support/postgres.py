"""A real PostgreSQL server for tests: Debian's `postgresql` binaries (initdb, pg_ctl), a data
directory of its own in a temp folder, 127.0.0.1 on a free port, password authentication; stopped
and deleted in `finally`. As root, the server runs as the `postgres` user (initdb refuses root).

`make test` installs the package (scripts/install-system-packages). Where the binaries are
missing, a test that needs the server is skipped on a developer's machine and fails under CI
(CI=true), so CI can never pass without running it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from support.servers import free_port

USER = "parley"
PASSWORD = "parley-test-password"


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def require_server_binaries() -> Path:
    folder = server_binaries()
    if folder is None:
        message = "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: run `make system-packages` (Debian's postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return folder


@dataclass
class PostgresServer:
    port: int
    data_dir: Path
    log_path: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "test_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb, pg_ctl start (waits until it accepts connections), yield, pg_ctl stop, delete."""
    binaries = require_server_binaries()
    folder = Path(tempfile.mkdtemp(prefix="parley-postgres-"))
    data_dir, socket_dir, log_path, password_file = folder / "data", folder / "socket", folder / "server.log", folder / "password"
    socket_dir.mkdir()
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        for path in (socket_dir, password_file):
            shutil.chown(path, "postgres")
    server = PostgresServer(free_port(), data_dir, log_path)
    started = False
    try:
        try:
            subprocess.run(
                _as_server_user([str(binaries / "initdb"), "-D", str(data_dir), "-U", USER, f"--pwfile={password_file}",
                                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                check=True, capture_output=True, text=True, timeout=120,
            )
            # fsync off: a test kills agents, never the server, and durability on disk is not what it asserts.
            options = (f"-p {server.port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            subprocess.run(
                _as_server_user([str(binaries / "pg_ctl"), "-D", str(data_dir), "-l", str(log_path), "-o", options,
                                 "-w", "-t", "60", "start"]),
                check=True, capture_output=True, text=True, timeout=90,
            )
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"PostgreSQL did not start: {error.stderr or error.stdout}\nserver log:\n{server.log()}") from None
        started = True
        yield server
    finally:
        if started or (data_dir / "postmaster.pid").exists():  # also a server whose start timed out
            subprocess.run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
