"""The gunicorn settings every service runs with: which port it binds when SERVICE_PORT is unset or malformed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.servers import REPO_ROOT

SERVICE_DEFAULT_PORTS = {
    "services/transformers_lm": 8180,
    "services/openai_api_lm": 8181,
    "services/agent": 4242,
    "skills/prompted_skill": 8147,
}


def read_bind(folder: str, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SERVICE_PORT"} | {"PYTHONPATH": str(REPO_ROOT), **environ}
    return subprocess.run(
        [sys.executable, "-c", "import common.gunicorn_conf as conf; print(conf.bind)"],
        cwd=REPO_ROOT / folder, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("folder, port", SERVICE_DEFAULT_PORTS.items())
def test_without_service_port_a_service_binds_the_default_its_settings_document(folder, port):
    result = read_bind(folder)

    assert result.stdout.strip() == f"0.0.0.0:{port}", result.stderr


def test_service_port_is_bound_when_set_and_a_malformed_one_stops_gunicorn_with_one_line():
    assert read_bind("services/agent", SERVICE_PORT="9001").stdout.strip() == "0.0.0.0:9001"

    malformed = read_bind("services/agent", SERVICE_PORT="80a")

    assert malformed.returncode != 0
    assert malformed.stderr.strip() == "SERVICE_PORT must be a port number (1-65535), not '80a'"


def test_without_service_port_outside_a_service_folder_gunicorn_stops_with_one_line():
    result = read_bind("common")

    assert result.returncode != 0
    assert result.stderr.strip().startswith("SERVICE_PORT is not set, and ")
