"""Dream's state formatters that the agent knows, by name: what a service is sent, how its answer is read.

A pipeline names them Dream's way (`state_formatters.dp_formatters:full_history_dialog`); only the
part after the colon matters. Dialog formatters turn the dialog into one request for a batch of
one; response formatters turn the service's answer for that dialog into what the state method stores.
The dialog they get holds the turn's recent utterances only (`service.HISTORY_UTTERANCES`).
"""

from __future__ import annotations

import re
from typing import Any, Callable


def short_name(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def dialogs_batch(dialog: dict) -> dict:
    """`{"dialogs": [dialog]}`: what Dream skills and selectors take."""
    return {"dialogs": [dialog]}


def last_human_sentences(dialog: dict) -> dict:
    return {"sentences": [dialog["human_utterances"][-1]["text"]]}


def hypotheses_sentences(dialog: dict) -> dict:
    return {"sentences": [h["text"] for h in dialog["human_utterances"][-1].get("hypotheses", [])]}


DIALOG_FORMATTERS: dict[str, Callable[[dict], dict]] = {
    "full_dialog": dialogs_batch,
    "full_history_dialog": dialogs_batch,
    "dff_universal_prompted_skill_formatter": dialogs_batch,
    "dff_prompted_skill_formatter": dialogs_batch,
    "base_skill_selector_formatter_dialog": dialogs_batch,
    "utt_sentrewrite_modified_last_dialog": dialogs_batch,
    "last_utt_dialog": last_human_sentences,
    "preproc_last_human_utt_dialog": last_human_sentences,
    "hypotheses_list": hypotheses_sentences,
}


def simple(payload: Any) -> Any:
    return payload


def _hypothesis(item: list | tuple) -> dict:
    hypothesis = {"text": item[0], "confidence": item[1]}
    if len(item) >= 4:
        hypothesis["human_attributes"] = item[2] if isinstance(item[2], dict) else {}
        hypothesis["bot_attributes"] = item[3] if isinstance(item[3], dict) else {}
    if len(item) in (3, 5) and isinstance(item[-1], dict):
        hypothesis.update(item[-1])
    return hypothesis


def skill_with_attributes(payload: Any) -> list[dict]:
    """Dream skills' `(text, confidence, [human_attrs, bot_attrs,] attrs)`, or parallel lists of them.

    Parallel lists of different lengths are refused (ValueError, so the skill is skipped with that
    reason), never cut to the shortest.
    """
    if not isinstance(payload, (list, tuple)) or len(payload) < 2:
        raise ValueError("a skill's answer must be [text, confidence, ...] or lists of them")
    if isinstance(payload[0], list) and isinstance(payload[1], list):
        if not all(isinstance(part, list) for part in payload):
            raise ValueError("a skill's answer mixes parallel lists with single values")
        try:
            items = list(zip(*payload, strict=True))
        except ValueError:
            lengths = ", ".join(str(len(part)) for part in payload)
            raise ValueError(f"a skill's parallel lists differ in length ({lengths}): one item per hypothesis") from None
    else:
        items = [payload]
    hypotheses = []
    for item in items:
        text, confidence = item[0], item[1]
        if isinstance(text, str) and text.strip() and isinstance(confidence, (int, float)) and confidence > 0:
            hypotheses.append(_hypothesis(item))
    return hypotheses


def base_skill(payload: Any) -> list[dict]:
    return skill_with_attributes(list(payload[:2]))


def base_response_selector(payload: Any) -> dict:
    """Dream's selector answer `[skill_name, text, confidence, human_attrs, bot_attrs]`, or already a dict."""
    if isinstance(payload, dict):
        return payload
    skill_name, text, confidence, *rest = payload
    return {
        "skill_name": skill_name,
        "text": text,
        "confidence": confidence,
        "human_attributes": rest[0] if len(rest) > 0 else {},
        "bot_attributes": rest[1] if len(rest) > 1 else {},
    }


RESPONSE_FORMATTERS: dict[str, Callable[[Any], Any]] = {
    "simple_formatter_service": simple,
    "skill_with_attributes_formatter_service": skill_with_attributes,
    "base_skill_formatter": base_skill,
    "base_response_selector_formatter_service": base_response_selector,
}


# Dream names each template prompted skill's formatter after the skill (`dff_fairytale_prompted_skill_formatter`):
# every one of them sends the dialog as it is.
_PROMPTED_SKILL_FORMATTER = re.compile(r"dff_\w+_prompted_skill_formatter")


def dialog_formatter(name: str | None) -> Callable[[dict], dict]:
    if not name:
        return dialogs_batch
    if short_name(name) not in DIALOG_FORMATTERS and _PROMPTED_SKILL_FORMATTER.fullmatch(short_name(name)):
        return dialogs_batch
    return DIALOG_FORMATTERS[short_name(name)]


def knows_dialog_formatter(name: str) -> bool:
    return short_name(name) in DIALOG_FORMATTERS or bool(_PROMPTED_SKILL_FORMATTER.fullmatch(short_name(name)))


def response_formatter(name: str | None) -> Callable[[Any], Any]:
    return RESPONSE_FORMATTERS[short_name(name)] if name else simple
