"""The chat page (`GET /`, `GET /chat`) and the list of LLMs it offers (`GET /api/llms`).

Plain HTML, CSS and JavaScript served from this package's templates/ and static/ folders: no build
step, nothing fetched from the internet. The page talks to the agent's own API (`POST /`,
`GET /api/dialogs/<id>`), so what it shows after a reload is the agent's stored state.

The page itself (HTML, CSS, script) needs no API key: it holds no data, and it is what asks for the
key (once per browser tab, kept in the tab's sessionStorage) when the agent answers 401. Everything
it shows comes through the API, which does need the key.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template

from services.agent.llm_choices import LLMChoices

chat_page = Blueprint("chat_page", __name__)
# The page and its files answer without a key (common/auth.py guards everything else).
PUBLIC_ROUTES = (("GET", "/"), ("GET", "/chat"), ("GET", "/static/<path:filename>"))


@chat_page.get("/")
@chat_page.get("/chat")
def page() -> str:
    agent = current_app.extensions["agent"]
    title = agent.pipeline.metadata.get("display_name") or "Parley"
    return render_template("chat.html", title=title)


@chat_page.get("/api/llms")
def llms() -> Response:
    return jsonify({"llms": current_app.extensions["llm_choices"].get()})


def init_app(app: Flask) -> None:
    agent = app.extensions["agent"]
    app.extensions["llm_choices"] = LLMChoices(agent.pipeline, agent.session)
    app.register_blueprint(chat_page)
