"""How the agent reaches a service: over HTTP, or one of its own python connectors.

Python connectors are the agent's built-ins, named in a pipeline by `class_name`; each takes the
turn's dialog (Dream's dict) and its connector options and returns the finished result.
"""

from __future__ import annotations

from typing import Any, Callable

import requests

from services.agent import skill_selection
from services.agent.skill_selection import Selection


class ServiceCallError(RuntimeError):
    """A service that failed: unreachable, an error status, or an answer that is not what it should be."""


def call_http(session: requests.Session, url: str, payload: dict, timeout_seconds: float,
              headers: dict[str, str] | None = None) -> Any:
    """POST a batch of one dialog (with `headers`: the agent's key, the turn's traceparent); return
    the service's answer for that dialog."""
    try:
        response = session.post(url, json=payload, timeout=timeout_seconds, headers=headers)
    except requests.Timeout:
        raise ServiceCallError(f"no answer within its timeout of {timeout_seconds:g}s") from None
    except requests.RequestException as error:
        raise ServiceCallError(f"unreachable ({type(error).__name__})") from None
    if response.status_code != 200:
        raise ServiceCallError(f"answered {response.status_code}: {response.text[:200]}")
    try:
        batch = response.json()
    except ValueError:
        raise ServiceCallError("answered a body that is not JSON") from None
    if not isinstance(batch, list) or len(batch) != 1:
        raise ServiceCallError("answered something other than a list with one result per dialog")
    return batch[0]


def predefined_text(dialog: dict, options: dict) -> dict:
    """Dream's PredefinedTextConnector: always the same answer (for last-chance and timeout answers)."""
    return {
        "text": str(options.get("response_text", "")),
        "confidence": float(options.get("confidence", 0.0)),
        "annotations": options.get("annotations") or {},
    }


def all_skills_selector(dialog: dict, options: dict) -> Selection:
    """Selects every skill of the pipeline, or those the turn's `selected_skills` names (Dream's attribute)."""
    names = list(options.get("skill_names") or [])
    override = skill_selection.requested((dialog["human_utterances"][-1].get("attributes") or {}), names)
    if override is not None and override[0] is not None:
        return Selection(override[0], override[1], {name: override[1] for name in override[0]})
    reason = "the pipeline's skill selector asks every skill"
    return Selection(None, reason, {name: reason for name in names})


def description_based_skill_selector(dialog: dict, options: dict) -> Selection:
    """Dream's DescriptionBasedSkillSelectorConnector with its prompt selector inside: the prompted
    skills whose goals rank best for the turn (services/agent/skill_selection.py), the other skills
    always; options `top_n` (default 1) and `min_score` (default 0)."""
    return skill_selection.select_skills(
        dialog,
        list(options.get("skill_names") or []),
        dict(options.get("skill_goals") or {}),
        top_n=int(options.get("top_n", 1)),
        min_score=float(options.get("min_score", 0.0)),
        language=str(options.get("language") or skill_selection.DEFAULT_LANGUAGE),
    )


def confidence_response_selector(dialog: dict, options: dict) -> dict | None:
    """The hypothesis with the highest confidence (the first of equals); None when there is none."""
    hypotheses = dialog["human_utterances"][-1].get("hypotheses") or []
    if not hypotheses:
        return None
    best = max(hypotheses, key=lambda h: h.get("confidence", 0.0))
    return {
        "skill_name": best["skill_name"],
        "text": best["text"],
        "confidence": best.get("confidence", 0.0),
        "human_attributes": best.get("human_attributes") or {},
        "bot_attributes": best.get("bot_attributes") or {},
    }


PYTHON_CONNECTORS: dict[str, Callable[[dict, dict], Any]] = {
    "PredefinedTextConnector": predefined_text,
    "AllSkillsSelectorConnector": all_skills_selector,
    "DescriptionBasedSkillSelectorConnector": description_based_skill_selector,
    "ConfidenceResponseSelectorConnector": confidence_response_selector,
}


def python_connector(class_name: Any) -> Callable[[dict, dict], Any] | None:
    if not isinstance(class_name, str):
        return None
    return PYTHON_CONNECTORS.get(class_name.rsplit(":", 1)[-1])
