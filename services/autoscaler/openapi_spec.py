"""The autoscaler's API as OpenAPI operations (served at `/openapi.json` by `common.openapi`): it only reports."""

from __future__ import annotations

from pydantic import BaseModel, Field

from common.openapi import Api, Body, Operation


class ScaledServiceHealth(BaseModel):
    replicas: int = Field(description="the replicas the service asks for")
    per_node: dict[str, int] = Field(description="running replicas per node (by hostname)")
    last_decision: str = Field(description="the last decision, with its reason")


class AutoscalerHealth(BaseModel):
    status: str = Field(description="ok: it can scale; failing (503): it cannot, see error")
    service: str
    stack: str | None = Field(description="the stack whose services it scales")
    interval_s: float
    error: str | None
    services: dict[str, ScaledServiceHealth]


API = Api(
    title="Parley autoscaler",
    version="0.1.0",
    description="Scales a Swarm stack's LLM services between their cards' bounds by the requests in progress; it only reports over HTTP.",
    operations=[
        Operation("GET", "/health", "Whether it can scale, and each autoscaled service's replicas and last decision",
                  responses={200: Body(AutoscalerHealth)}, errors=(503,)),
        Operation("GET", "/ping", "Dream's liveness check: \"pong\" once it can scale", responses={200: Body(str)}, errors=(503,)),
        Operation("POST", "/ping", "Dream's liveness check: \"pong\" once it can scale", responses={200: Body(str)}, errors=(503,)),
    ],
)
