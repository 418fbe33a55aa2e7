"""The shared-state overlay of a distribution (`postgres.yml`), generated from the state card
(through its kind, parley/kinds/state.py, and the agent's, parley/kinds/agent.py).

It adds the database service of the card (`components/postgres.yml`: its port, database and memory)
and points the agent at it: `STATE_URL=postgresql://...` and a `depends_on` on its health. With it,
every agent process shares one database, so `parley stack` runs the agent as several replicas.
The password is not in any file: it comes from PARLEY_POSTGRES_PASSWORD (`.env` or the shell),
with a default for a database that only the stack's own network reaches.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from parley.cards import Card

STATE_OVERLAY = "postgres.yml"
DATABASE_USER = "parley"
PASSWORD = "${PARLEY_POSTGRES_PASSWORD:-parley}"
DATA_DIR = "/var/lib/parley/postgres"
BASE_IMAGE = "${BASE_IMAGE:-python:3.11-slim}"


def _flow(items: list[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def state_url(card: Card) -> str:
    """The agent's STATE_URL for the state card's database (the password from the environment)."""
    return f"postgresql://{DATABASE_USER}:{PASSWORD}@{card.name}:{card.port}/{card.database}"


def volume_name(card: Card) -> str:
    return f"{card.name}-data"


def state_compose_service(card: Card) -> CommentedMap:
    """The database's service: Debian's PostgreSQL image, its volume, a healthcheck, a memory limit."""
    service = CommentedMap()
    service["build"] = CommentedMap([("context", "."), ("dockerfile", f"{card.service}/Dockerfile"),
                                     ("args", CommentedMap([("BASE_IMAGE", BASE_IMAGE)]))])
    service["init"] = True
    service["environment"] = CommentedMap([
        ("POSTGRES_USER", DATABASE_USER), ("POSTGRES_DB", card.database),
        ("POSTGRES_PASSWORD", DoubleQuotedScalarString(PASSWORD)), ("PORT", card.port),
    ])
    service["volumes"] = CommentedSeq([f"{volume_name(card)}:{DATA_DIR}"])
    service["healthcheck"] = CommentedMap([
        ("test", _flow(["CMD", "pg_isready", "-h", "127.0.0.1", "-p", str(card.port), "-U", DATABASE_USER, "-d", card.database])),
        ("interval", "5s"), ("timeout", "5s"), ("retries", 24), ("start_period", "30s"),
    ])
    # PostgreSQL's fast shutdown; the grace lets it write its last checkpoint.
    service["stop_signal"] = "SIGINT"
    service["stop_grace_period"] = "30s"
    service["deploy"] = CommentedMap([("resources", CommentedMap([("limits", CommentedMap([("memory", card.ram_usage)]))]))])
    service["restart"] = "unless-stopped"
    return service
