"""The `parley` command line as its users meet it: help texts, the README's copy of them, `parley chat`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click
import pytest
from click.testing import CliRunner
from support.servers import REPO_ROOT

from parley.cli import cli
from parley.docs import update_readme

COMMANDS = sorted(cli.commands)


def test_readme_holds_the_current_help_of_every_command():
    changed = update_readme(REPO_ROOT / "README.md", cli, write=False)

    assert not changed, "README.md's command reference is out of date: run `.venv/bin/parley docs`"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_shows_an_example_in_its_help(name: str):
    result = CliRunner().invoke(cli, [name, "--help"], catch_exceptions=False)

    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"parley {name}" in result.output.split("Example", 1)[1]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str):
    command = cli.commands[name]

    undocumented = [option.name for option in command.params if isinstance(option, click.Option) and not option.help]

    assert undocumented == []


def test_the_group_help_lists_every_command_with_an_example():
    output = CliRunner().invoke(cli, ["--help"], catch_exceptions=False).output

    examples = output.split("Examples:", 1)[1]
    for name in ("add-llm", "remove-llm", "check", "up", "chat"):
        assert f"parley {name}" in examples


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
