"""`parley engine`: the checks it makes before touching the machine, and how its steps report.

Tier: in-process. The engine itself (packages, dockerd, base image, stop and its leftovers) runs
for real in `make test-docker`; here only the steps that touch nothing outside a tmp folder run.
"""

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from parley.cli import cli
from parley.engine import EngineLayout
from parley.engine.base_image import supply_site_files, write_env_file
from parley.progress import Progress


class _Recorder(Progress):
    def __init__(self):
        self.events: list[tuple] = []

    def begin(self, title):
        self.events.append(("begin", title))

    def say(self, line):
        self.events.append(("say", line))

    def end(self, title, seconds, *, failed):
        self.events.append(("end", title, failed))


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


def test_the_env_file_step_writes_base_image_and_reports_through_progress_without_printing(tmp_path: Path, capsys):
    layout = EngineLayout(env_file=tmp_path / "engine.env", site_dir=tmp_path / "docker")
    progress = _Recorder()

    with progress.step("environment for compose"):
        write_env_file(layout, "parley-base:trixie", progress)

    assert "BASE_IMAGE=parley-base:trixie\n" in layout.env_file.read_text()
    assert progress.events == [
        ("begin", "environment for compose"),
        ("say", f"{layout.env_file}: BASE_IMAGE=parley-base:trixie"),
        ("end", "environment for compose", False),
    ]
    assert capsys.readouterr() == ("", "")


def test_a_step_that_fails_is_reported_as_failed_and_its_error_goes_on(tmp_path: Path):
    progress = _Recorder()

    with pytest.raises(FileNotFoundError), progress.step("site supplies"):
        raise FileNotFoundError("no such folder")

    assert progress.events == [("begin", "site supplies"), ("end", "site supplies", True)]


def test_site_supplies_outside_a_checkout_say_there_is_nothing_to_supply(tmp_path: Path):
    layout = EngineLayout(env_file=tmp_path / "engine.env", site_dir=tmp_path / "not-a-checkout")
    progress = _Recorder()

    supply_site_files(layout, progress)

    assert progress.events == [("say", f"no {layout.site_dir / 'wheels'} (not a Parley checkout?): nothing to supply")]
