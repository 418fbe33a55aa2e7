"""The prompted skill's API as OpenAPI operations (served at `/openapi.json` by `common.openapi`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from common.openapi import Api, Body, Operation
from skills.prompted_skill.protocol import SkillRequest

# Dream's reply for one dialog: [texts, confidences, human_attributes, bot_attributes, attributes], each a
# list with one item per hypothesis; with no hypothesis, ["", 0.0, {}, {}, {why}].
DialogReply = Annotated[
    list[list[str] | list[float] | list[dict[str, Any]] | str | float | dict[str, Any]],
    Field(min_length=5, max_length=5),
]


class SkillHealth(BaseModel):
    status: str
    service: str
    llm_endpoints: list[str]


API = Api(
    title="Parley prompted skill",
    version="0.1.0",
    description="Dream's skill API over an LLM's /respond: the agent's batch of dialogs in, hypotheses per dialog out.",
    operations=[
        Operation(
            "POST", "/respond", "Hypotheses for each dialog of the batch",
            request=SkillRequest,
            request_example={"dialogs": [{"human_utterances": [{"text": "Hi!", "attributes": {}}]}]},
            responses={200: Body(list[DialogReply], "one reply per dialog")},
            errors=(400, 413),
        ),
        Operation("GET", "/health", "Ready; the LLM URLs this skill may call", responses={200: Body(SkillHealth)}),
        Operation("GET", "/ping", "Dream's liveness check: \"pong\" (ready once started: nothing to load)",
                  responses={200: Body(str)}),
        Operation("POST", "/ping", "Dream's liveness check: \"pong\" (ready once started: nothing to load)",
                  responses={200: Body(str)}),
    ],
)
