"""The autoscaler kind: the service of a swarm stack that scales the LLMs whose cards have
`deploy.autoscaling` (components/autoscaler.yml, services/autoscaler).

It is in no distribution's override: each distribution's autoscaler.yml overlay runs it, which
`parley stack` applies when a card of the distribution autoscales. The service itself is
parley/autoscaler_overlay.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ruamel.yaml.comments import CommentedMap

from parley.kinds import AUTOSCALER, DistContext, Kind

if TYPE_CHECKING:
    from parley.cards import Card


class Autoscaler(Kind):
    name = "autoscaler"
    description = "scales a swarm stack's LLM replicas by their requests in progress (services/autoscaler, the autoscaler.yml overlay)"
    group = "autoscaler"
    package = "services/autoscaler"
    first_port = 8099
    scales_services = True
    waited_for = False

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        from parley.autoscaler_overlay import autoscaler_compose_service

        if overlay == AUTOSCALER and ctx.autoscaler is not None and ctx.autoscaler.name == card.name:
            return autoscaler_compose_service(card)
        return None

    def published_port(self, card: "Card") -> str:
        return ""  # never published: it answers its own healthcheck only


def register_kinds(register) -> None:
    register(Autoscaler)
