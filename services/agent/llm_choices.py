"""The LLMs a person may pick on the chat page: the allowlists of the pipeline's skills, never a free URL.

Each HTTP skill of the pipeline reports on its `/health` the LLM `/respond` URLs it may call
(`llm_endpoints`, which `parley` generates from the LLM cards); each LLM's own `/health` names it.
A turn that picks one sends it as `lm_service_url`, which the skill checks against the same list.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import requests

from services.agent.pipeline import Pipeline

HEALTH_TIMEOUT_SECONDS = 3.0
CACHE_SECONDS = 30.0


@dataclass
class LLMChoice:
    url: str
    name: str
    model: str | None = None
    skills: list[str] = field(default_factory=list)


def _health(session: requests.Session, respond_url: str) -> dict:
    base = respond_url.rsplit("/", 1)[0]
    try:
        answer = session.get(base + "/health", timeout=HEALTH_TIMEOUT_SECONDS)
        body = answer.json()
    except (requests.RequestException, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def offered_llms(pipeline: Pipeline, session: requests.Session) -> list[LLMChoice]:
    """Every LLM that some skill of the pipeline may call, named by the LLM's own /health."""
    choices: dict[str, LLMChoice] = {}
    for service in pipeline.services:
        if service.group != "skills" or service.connector.protocol != "http" or not service.connector.url:
            continue
        urls = _health(session, service.connector.url).get("llm_endpoints") or []
        for url in urls:
            if isinstance(url, str):
                choice = choices.setdefault(url, LLMChoice(url=url, name=url))
                choice.skills.append(service.short_name)
    for choice in choices.values():
        health = _health(session, choice.url)
        if isinstance(health.get("service"), str) and health["service"]:
            choice.name = health["service"]
        if isinstance(health.get("model"), str):
            choice.model = health["model"]
    return list(choices.values())


class LLMChoices:
    """`offered_llms`, asked again at most every CACHE_SECONDS (the page asks on every load)."""

    def __init__(self, pipeline: Pipeline, session: requests.Session):
        self.pipeline, self.session = pipeline, session
        self._lock = threading.Lock()
        self._cached: tuple[float, list[dict]] | None = None

    def get(self) -> list[dict]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
        found = [asdict(choice) for choice in offered_llms(self.pipeline, self.session)]
        with self._lock:
            if found:  # an empty answer (skills still starting) is asked again next time
                self._cached = (time.monotonic(), found)
        return found
