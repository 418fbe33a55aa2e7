"""Wire models of the skill's `/respond`: the agent's batch of dialogs in, hypotheses per dialog out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Utterance(BaseModel):
    """One utterance as the agent sends it; only `text` and `attributes` matter to this skill."""

    model_config = ConfigDict(extra="allow")

    text: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)


class Dialog(BaseModel):
    """One dialog of the batch: all its utterances (oldest first) and the human's and bot's own."""

    model_config = ConfigDict(extra="allow")

    utterances: list[Utterance] = Field(default_factory=list)
    human_utterances: list[Utterance] = Field(min_length=1)
    bot_utterances: list[Utterance] = Field(default_factory=list)


class SkillRequest(BaseModel):
    """`POST /respond`: Dream's skill batch `{"dialogs": [...]}`."""

    dialogs: list[Dialog] = Field(min_length=1)


class Hypothesis(BaseModel):
    """One candidate answer with its confidence and the attributes Dream skills attach."""

    text: str
    confidence: float
    human_attributes: dict[str, Any] = Field(default_factory=dict)
    bot_attributes: dict[str, Any] = Field(default_factory=dict)
    attributes: dict[str, Any] = Field(default_factory=dict)


class DialogReply(BaseModel):
    """The skill's answer for one dialog: its hypotheses, and why there are none when so."""

    hypotheses: list[Hypothesis] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)

    def to_dream(self) -> list:
        """Dream's skill reply for one dialog: `[texts, confidences, human_attrs, bot_attrs, attrs]`.

        With no hypothesis it is one empty hypothesis (text "", confidence 0) whose attributes say
        why; Dream's agent drops it as it does any empty text.
        """
        if not self.hypotheses:
            return ["", 0.0, {}, {}, dict(self.attributes)]
        return [
            [h.text for h in self.hypotheses],
            [h.confidence for h in self.hypotheses],
            [h.human_attributes for h in self.hypotheses],
            [h.bot_attributes for h in self.hypotheses],
            [{**self.attributes, **h.attributes} for h in self.hypotheses],
        ]
