"""The shared-state overlay (`postgres.yml`): generated from the state card by `parley generate`,
checked by `parley check`, valid compose (the real Compose binary merges it), and what the agent
reads from it is a PostgreSQL STATE_URL its store opens. In-process CLI on a copy of the bundle;
the overlay's database runs for real in make test-docker (tests/docker/test_bundle_in_docker.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from parley.tools import compose_binary
from parley.cli import cli
from services.agent.settings import Settings
from services.agent.store import store_class
from services.agent.store.postgres import PostgresDialogStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST = "universal_prompted_assistant"
OVERLAY = f"assistant_dists/{DIST}/postgres.yml"
BUNDLE = [".env", "docker-compose.yml", "components.tsv", "MODELS.md", "components", "assistant_dists", "common", "services", "skills"]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in BUNDLE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    return root


def parley(root: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [*args, "--repo", str(root)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def merged(root: Path, *overlays: str, env: dict[str, str] | None = None) -> dict:
    files = ["docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml", *(f"assistant_dists/{DIST}/{o}" for o in overlays)]
    command = [compose_binary(), "--project-directory", str(root), *(a for f in files for a in ("-f", f)), "config", "--format", "json"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "PARLEY_"))} | (env or {})
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_overlay_follows_the_state_card_and_check_says_when_it_does_not(checkout: Path):
    card = checkout / "components" / "postgres.yml"
    card.write_text(card.read_text().replace("postgresql://postgres:5432/parley", "postgresql://postgres:5433/dialogs"))

    found = parley(checkout, "check", "--no-tools", code=1)
    parley(checkout, "generate")

    assert f"{OVERLAY}: services.agent.environment.STATE_URL: differs from what the cards generate; run `parley generate`" in found
    overlay = (checkout / OVERLAY).read_text()
    assert 'STATE_URL: "postgresql://parley:${PARLEY_POSTGRES_PASSWORD:-parley}@postgres:5433/dialogs"' in overlay
    assert "POSTGRES_DB: dialogs" in overlay and "PORT: 5433" in overlay
    assert "[CMD, pg_isready, -h, 127.0.0.1, -p, '5433', -U, parley, -d, dialogs]" in overlay
    assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"


def test_generate_keeps_the_overlays_hand_written_comments(checkout: Path):
    before = (checkout / OVERLAY).read_text()
    assert "# Shared-state overlay:" in before

    assert parley(checkout, "generate") == "nothing to change: every generated file is already in place\n"


def test_the_database_has_a_healthcheck_init_a_memory_limit_and_a_named_volume_and_the_agent_waits_for_it(checkout: Path):
    services = merged(checkout, "cpu.yml", "postgres.yml")["services"]

    database = services["postgres"]
    assert database["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert database["init"] is True
    assert database["deploy"]["resources"]["limits"]["memory"] == str(512 * 1024 * 1024)
    assert [(v["type"], v["source"]) for v in database["volumes"]] == [("volume", "postgres-data")]
    assert services["agent"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_agent_reads_a_postgresql_state_url_with_the_password_from_the_environment(checkout: Path):
    environment = merged(checkout, "postgres.yml", env={"PARLEY_POSTGRES_PASSWORD": "s3cret"})["services"]["agent"]["environment"]

    settings = Settings.from_env({key: str(value) for key, value in environment.items()})

    assert settings.state_location == "postgresql://parley:s3cret@postgres:5432/parley"
    assert store_class(settings.state_location) is PostgresDialogStore
    assert merged(checkout, "postgres.yml", env={"PARLEY_POSTGRES_PASSWORD": "s3cret"})["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"


def test_without_the_overlay_the_agent_keeps_sqlite_state():
    settings = Settings.from_env({"STATE_DB_PATH": "/var/lib/parley/agent/dialogs.sqlite3"})

    assert settings.state_location == "sqlite:////var/lib/parley/agent/dialogs.sqlite3"
