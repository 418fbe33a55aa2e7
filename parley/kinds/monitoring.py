"""The monitoring kind: Prometheus, scraping the /metrics of every service of a distribution
(components/prometheus.yml, services/prometheus).

It is in no distribution's override: each distribution's monitoring.yml overlay runs it (its
service, its volume), and `parley up --monitoring` runs the same overlay. The service itself is
parley/monitoring_overlay.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ruamel.yaml.comments import CommentedMap

from parley.kinds import MONITORING, DistContext, Kind

if TYPE_CHECKING:
    from parley.cards import Card


class Monitoring(Kind):
    name = "monitoring"
    description = "Prometheus scraping every service's /metrics (services/prometheus, the monitoring.yml overlay)"
    group = "monitoring"
    package = "services/prometheus"
    first_port = 9090
    watches_services = True
    waited_for = False

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        from parley.monitoring_overlay import monitoring_compose_service, scrape_targets

        if overlay == MONITORING and ctx.monitor is not None and ctx.monitor.name == card.name:
            return monitoring_compose_service(card, scrape_targets(ctx.cards, [served.name for served in ctx.runs()]))
        return None

    def overlay_volumes(self, card: "Card", overlay: str) -> list[str]:
        from parley.monitoring_overlay import volume_name

        return [volume_name(card)] if overlay == MONITORING else []

    def published_port(self, card: "Card") -> str:
        return ""  # it listens on its container's loopback only: it has no keys of its own


def register_kinds(register) -> None:
    register(Monitoring)
