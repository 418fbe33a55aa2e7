"""`parley engine`: the checks it makes before touching the machine (the engine itself runs in make test-docker)."""

import sys

import pytest
from click.testing import CliRunner

from parley.cli import cli


@pytest.mark.parametrize("action", ["start", "stop"])
def test_start_and_stop_refuse_to_run_without_root_and_say_how(monkeypatch, action):
    monkeypatch.setattr("os.geteuid", lambda: 1000)

    result = CliRunner().invoke(cli, ["engine", action])

    assert result.exit_code == 1
    assert f"parley engine {action} must run as root" in result.output
    assert f"Run: sudo {sys.executable.rsplit('/', 1)[0]}/parley engine {action}" in result.output


def test_status_needs_no_root_and_names_the_data_root(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)

    result = CliRunner().invoke(cli, ["engine", "status"])

    assert result.exit_code == 0
    assert result.output.startswith("engine: ")
    assert "data root: /var/lib/parley-docker" in result.output
