"""The `parley` command line as its users meet it: help texts, the README's copy of them (`parley docs`), `parley chat`.

Tier: in-process (click's CliRunner); `parley chat` talks to a real HTTP server on loopback that
answers like the agent (the real agent is chatted with in tests/test_dialog_parley_up.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.servers import REPO_ROOT

from parley.cli import cli
from parley.docs import BEGIN, END, command_reference, help_problems, update_readme, walk_commands

def _readme_with_markers(tmp_path: Path) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(f"# A project\n\n{BEGIN}\n(out of date)\n{END}\n\nThe rest stays.\n")
    return readme


def test_the_readme_holds_the_current_help_and_every_help_text_is_complete():
    # The one check of the CLI's docs, as `make test` runs it.
    result = CliRunner().invoke(cli, ["docs", "--check", "--repo", str(REPO_ROOT)], catch_exceptions=False)

    assert result.exit_code == 0, f"{result.output}\nrun `.venv/bin/parley docs`"
    assert "README.md is up to date" in result.output


def test_the_reference_holds_the_help_of_every_subcommand():
    reference = command_reference(cli)

    for words in ("engine start", "engine status", "engine stop"):
        assert f"#### `parley {words}`\n\n```text\n$ parley {words} --help\nUsage: parley {words} [OPTIONS]" in reference


def test_docs_writes_the_reference_between_the_markers_and_keeps_the_rest(tmp_path: Path):
    readme = _readme_with_markers(tmp_path)

    assert update_readme(readme, cli) is True
    text = readme.read_text()

    assert text.startswith("# A project\n\n")
    assert text.endswith(f"{END}\n\nThe rest stays.\n")
    assert "(out of date)" not in text
    assert "$ parley engine stop --help" in text
    assert update_readme(readme, cli) is False  # a second run changes nothing


def test_docs_check_refuses_an_out_of_date_reference_and_writes_nothing(tmp_path: Path):
    readme = _readme_with_markers(tmp_path)
    (tmp_path / "components").mkdir()
    (tmp_path / "assistant_dists").mkdir()

    result = CliRunner().invoke(cli, ["docs", "--check", "--repo", str(tmp_path)])

    assert result.exit_code == 1
    assert "README.md's command reference is out of date: run `parley docs`" in result.output
    assert "(out of date)" in readme.read_text()


def _group_with_gaps() -> click.Group:
    @click.group(epilog="\b\nExamples:\n  parley good --name x")
    def group() -> None:
        """A group."""

    @group.command(name="good")
    @click.option("--name", help="A name.")
    def good(name) -> None:
        """Documented.

        \b
        Example:
          parley good --name x
        """

    @group.command(name="bare")
    @click.option("--flag", is_flag=True)
    def bare(flag) -> None:
        """No example, an option without help."""

    return group


def test_help_problems_name_a_command_without_an_example_an_option_without_help_and_a_gap_in_the_groups_examples():
    problems = help_problems(_group_with_gaps())

    assert problems == [
        "`parley bare --help`: no example of `parley bare`; add an Example section to its docstring",
        "`parley bare --help`: option --flag has no help=",
        "`parley --help`: its examples do not show `parley bare`; add one to the group's epilog",
    ]


def test_every_command_and_subcommand_of_parley_is_walked_in_help_order():
    paths = [path for path, _ in walk_commands(cli)]

    assert paths[:3] == ["parley add-component", "parley add-llm", "parley add-skill"]
    assert paths[paths.index("parley engine") + 1 : paths.index("parley engine") + 4] == [
        "parley engine start",
        "parley engine status",
        "parley engine stop",
    ]
    assert set(paths) >= {f"parley {name}" for name in cli.commands}


class _RecordingAgent(BaseHTTPRequestHandler):
    """Answers like the agent's POST /, echoing the payload, and records what it was sent."""

    received: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(body)
        if body["payload"] == "fail":
            data = json.dumps({"error": {"message": "payload: too long", "field": "payload"}}).encode()
            self.send_response(413)
        else:
            data = json.dumps({"response": f"you said {body['payload']}", "active_skill": "prompted_skill", "dialog_id": "d1"}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def agent_url():
    _RecordingAgent.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_chat_sends_each_line_as_a_turn_of_one_user_and_prints_the_answer(agent_url: str):
    result = CliRunner().invoke(cli, ["chat", agent_url], input="hello\nhow are you?\n\n", catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "bot> you said hello" in result.output
    assert "bot> you said how are you?" in result.output
    assert [turn["payload"] for turn in _RecordingAgent.received] == ["hello", "how are you?"]
    assert len({turn["user_id"] for turn in _RecordingAgent.received}) == 1


def test_chat_shows_the_agents_error_message(agent_url: str):
    result = CliRunner().invoke(cli, ["chat", agent_url], input="fail\n", catch_exceptions=False)

    assert result.exit_code == 1
    assert "answered 413: payload: too long" in result.output


def test_chat_says_how_to_start_an_agent_when_none_answers():
    from support.servers import free_port

    result = CliRunner().invoke(cli, ["chat", f"http://127.0.0.1:{free_port()}"], input="hi\n", catch_exceptions=False)

    assert result.exit_code == 1
    assert "start one with `parley up`" in result.output
