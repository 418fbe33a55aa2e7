"""Fixtures shared by the whole suite."""

import sys
from pathlib import Path

# tests/support is imported as `support` by every test module.
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/support/postgres.py); each test makes its own database."""
    from support.postgres import postgres_server

    with postgres_server() as server:
        yield server
