"""Dream's state manager methods: how a service's result is written into the turn's dialog."""

from __future__ import annotations

from typing import Any, Callable


def add_annotation(turn: Any, service_name: str, result: Any) -> None:
    turn.human_utterance["annotations"][service_name] = result


def add_annotation_and_reset_human_attributes_for_first_turn(turn: Any, service_name: str, result: Any) -> None:
    """Dream's: the annotation, and on a dialog's first turn the user's attributes cleared but for
    `disliked_skills` (what a user said before is not carried into a new dialog)."""
    add_annotation(turn, service_name, result)
    if len(turn.dialog["utterances"]) == 1:
        turn.reset_human_attributes(keep=("disliked_skills",))


def add_annotation_prev_bot_utt(turn: Any, service_name: str, result: Any) -> None:
    if turn.bot_utterance is not None:
        turn.bot_utterance["annotations"][service_name] = result


def add_hypothesis(turn: Any, service_name: str, result: Any) -> None:
    for hypothesis in result or []:
        turn.human_utterance["hypotheses"].append({"skill_name": service_name, **hypothesis})


def add_hypothesis_annotation_batch(turn: Any, service_name: str, result: Any) -> None:
    hypotheses = turn.human_utterance["hypotheses"]
    for hypothesis, annotation in zip(hypotheses, result or []):
        hypothesis.setdefault("annotations", {})[service_name] = annotation


def add_bot_utterance(turn: Any, service_name: str, result: Any) -> None:
    if result:
        turn.set_bot_utterance(
            text=result["text"],
            active_skill=result.get("skill_name") or service_name,
            confidence=float(result.get("confidence", 0.0)),
            human_attributes=result.get("human_attributes") or {},
            bot_attributes=result.get("bot_attributes") or {},
        )


def add_bot_utterance_last_chance(turn: Any, service_name: str, result: Any) -> None:
    if turn.bot_utterance is None and result:
        turn.set_bot_utterance(
            text=result["text"],
            active_skill=service_name,
            confidence=float(result.get("confidence", 0.0)),
            annotations=result.get("annotations") or {},
        )


STATE_METHODS: dict[str, Callable[[Any, str, Any], None]] = {
    "add_annotation": add_annotation,
    "add_annotation_and_reset_human_attributes_for_first_turn": add_annotation_and_reset_human_attributes_for_first_turn,
    "add_annotation_prev_bot_utt": add_annotation_prev_bot_utt,
    "add_hypothesis": add_hypothesis,
    "add_hypothesis_annotation_batch": add_hypothesis_annotation_batch,
    "add_bot_utterance": add_bot_utterance,
    "add_bot_utterance_last_chance": add_bot_utterance_last_chance,
}
