"""The agent's API as OpenAPI operations (served at `/openapi.json` by `common.openapi`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from common.openapi import Api, Body, Operation
from services.agent.llm_choices import LLMChoice
from services.agent.protocol import TurnRequest, TurnResponse


class CommandResponse(BaseModel):
    """`POST /` with payload `/start` or `/close`: the user's active dialog is closed."""

    user_id: str
    command: str


class Utterance(BaseModel):
    model_config = ConfigDict(extra="allow")

    utt_id: str
    text: str
    user: dict[str, Any]
    date_time: str


class StoredDialog(BaseModel):
    """A dialog as Dream's agent stores it: utterances oldest first (the bot's carry `active_skill`)."""

    model_config = ConfigDict(extra="allow")

    dialog_id: str
    utterances: list[Utterance]
    human_utterances: list[Utterance]
    bot_utterances: list[Utterance]
    date_start: str
    date_finish: str


class DialogsOfUser(BaseModel):
    user_id: str
    dialog_ids: list[str]


class AgentHealth(BaseModel):
    status: str
    service: str
    pipeline: list[str]
    waiting_for: list[str]


class OfferedLLMs(BaseModel):
    """The LLMs a turn may pick (`lm_service_url`): the allowlists of the pipeline's skills."""

    llms: list[LLMChoice]


API = Api(
    title="Parley agent",
    version="0.1.0",
    description="Dream's agent API: a user's turn through the distribution's pipeline, and the stored dialogs.",
    operations=[
        Operation(
            "POST", "/", "A user's turn: the answer, the skill that gave it and the dialog it belongs to",
            request=TurnRequest,
            request_example={"user_id": "me", "payload": "What is the capital of France?"},
            responses={200: [Body(TurnResponse, "the answer"), Body(CommandResponse, "a /start or /close command")]},
            errors=(400, 413),
            description="Fields other than the documented ones are stored as the utterance's attributes; "
            "fields named like `*_API_KEY` reach the skills for this turn only and are never stored.",
        ),
        Operation("GET", "/api/dialogs/<dialog_id>", "A stored dialog", responses={200: Body(StoredDialog)},
                  errors=(404,)),
        Operation("GET", "/api/user/<user_id>", "The ids of a user's dialogs, oldest first",
                  responses={200: Body(DialogsOfUser)}),
        Operation("GET", "/api/llms", "The LLMs a turn may pick as `lm_service_url`",
                  responses={200: Body(OfferedLLMs)}),
        Operation("GET", "/health", "Ready once every WAIT_HOSTS entry accepts connections",
                  responses={200: Body(AgentHealth, "ready"), 503: Body(AgentHealth, "still waiting")}),
        Operation("GET", "/ping", "Dream's liveness check: \"pong\" once ready, 503 before", responses={200: Body(str)},
                  errors=(503,)),
        Operation("POST", "/ping", "Dream's liveness check: \"pong\" once ready, 503 before", responses={200: Body(str)},
                  errors=(503,)),
    ],
)
