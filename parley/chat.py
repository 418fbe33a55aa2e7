"""`parley chat`'s wire: one POST per turn to an agent (Dream's agent API); the command holds the terminal loop."""

from __future__ import annotations

import uuid

import requests


class ChatError(RuntimeError):
    """The agent cannot be reached or answered with an error; the message says what to do."""


def send_turn(url: str, user_id: str, text: str, timeout: float, api_key: str | None = None) -> dict:
    """One user turn; the agent's JSON answer (`response`, `dialog_id`, `active_skill`, ...)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = requests.post(url.rstrip("/") + "/", json={"user_id": user_id, "payload": text}, timeout=timeout,
                              headers=headers)
    except requests.ConnectionError:
        raise ChatError(f"no agent answers on {url}: start one with `parley up` (or pass its URL)") from None
    except requests.Timeout:
        raise ChatError(f"the agent on {url} gave no answer within {timeout:.0f}s (--timeout to wait longer)") from None
    try:
        body = reply.json()
    except ValueError:
        raise ChatError(f"the agent on {url} answered {reply.status_code} with no JSON: {reply.text[:200]}") from None
    if reply.status_code == 401:
        raise ChatError(f"the agent on {url} needs an API key: set PARLEY_API_KEY (`parley secrets show` prints "
                        "the checkout's), or run from the checkout whose .env_secret holds it")
    if reply.status_code != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        raise ChatError(f"the agent on {url} answered {reply.status_code}: {message or body}")
    return body


def new_user_id() -> str:
    """A user id of its own for a chat session that was given none."""
    return f"parley-chat-{uuid.uuid4().hex[:8]}"
