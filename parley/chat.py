"""`parley chat`: talk to an agent from the terminal, one POST per turn (Dream's agent API)."""

from __future__ import annotations

import uuid

import click
import requests


class ChatError(RuntimeError):
    """The agent cannot be reached or answered with an error; the message says what to do."""


def send_turn(url: str, user_id: str, text: str, timeout: float) -> dict:
    """One user turn; the agent's JSON answer (`response`, `dialog_id`, `active_skill`, ...)."""
    try:
        reply = requests.post(url.rstrip("/") + "/", json={"user_id": user_id, "payload": text}, timeout=timeout)
    except requests.ConnectionError:
        raise ChatError(f"no agent answers on {url}: start one with `parley up` (or pass its URL)") from None
    except requests.Timeout:
        raise ChatError(f"the agent on {url} gave no answer within {timeout:.0f}s (--timeout to wait longer)") from None
    try:
        body = reply.json()
    except ValueError:
        raise ChatError(f"the agent on {url} answered {reply.status_code} with no JSON: {reply.text[:200]}") from None
    if reply.status_code != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        raise ChatError(f"the agent on {url} answered {reply.status_code}: {message or body}")
    return body


def chat_loop(url: str, *, user_id: str | None = None, timeout: float = 120.0) -> None:
    user_id = user_id or f"parley-chat-{uuid.uuid4().hex[:8]}"
    click.echo(f"chatting with {url} as {user_id}; an empty line or Ctrl-D ends it", err=True)
    while True:
        try:
            text = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
        except (EOFError, click.Abort):
            click.echo("", err=True)
            return
        if not text.strip():
            return
        answer = send_turn(url, user_id, text, timeout)
        skill = answer.get("active_skill")
        click.echo(f"bot> {answer.get('response', '')}" + (click.style(f"  [{skill}]", dim=True) if skill else ""))
