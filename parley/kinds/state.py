"""The state store kind: the PostgreSQL that every agent replica shares (components/postgres.yml).

It is in no distribution's override: each distribution's postgres.yml overlay runs it (its
service, its volume) and points the agents at it (the agent kind writes their STATE_URL). The
service itself is parley/state_overlay.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ruamel.yaml.comments import CommentedMap

from parley.kinds import POSTGRES, DistContext, Kind
from parley.state_overlay import state_compose_service, state_url, volume_name

if TYPE_CHECKING:
    from parley.cards import Card


class StateStore(Kind):
    name = "state-store"
    description = "the database every agent replica keeps the dialogs in (services/postgres, the postgres.yml overlay)"
    group = "state"
    package = "services/postgres"
    first_port = 5432
    stores_dialogs = True
    waited_for = False

    def state_url(self, card: "Card") -> str:
        return state_url(card)

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        if overlay == POSTGRES and ctx.store is not None and ctx.store.name == card.name:
            return state_compose_service(card)
        return None

    def overlay_volumes(self, card: "Card", overlay: str) -> list[str]:
        return [volume_name(card)] if overlay == POSTGRES else []

    def published_port(self, card: "Card") -> str:
        return ""  # never published: only the agents reach it, inside the stack's network


def register_kinds(register) -> None:
    register(StateStore)
