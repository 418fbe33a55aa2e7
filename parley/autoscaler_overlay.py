"""The autoscaler overlay of a distribution (`autoscaler.yml`), generated from the autoscaler card.

It adds the autoscaler's service (`components/autoscaler.yml`: its port and memory): its image,
the engine's socket mounted (it scales services through the engine's API), a healthcheck, and a
placement on a manager node (only a manager may scale). It is for Swarm stacks: `parley stack`
applies it whenever a card of the distribution has `deploy.autoscaling`, and `docker compose ...
-f autoscaler.yml build` builds its image with the others. Under plain `docker compose up` there
is nothing to scale, and its /health says so.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from parley.cards import Card
from parley.kinds import AUTOSCALER, BASE_IMAGE, http_health_test

AUTOSCALER_OVERLAY = AUTOSCALER
# The engine's socket, at the same path on every node; the only bind mount that travels to a swarm.
ENGINE_SOCKET = "/var/run/docker.sock"
MANAGER_NODE = "node.role == manager"


def autoscaler_compose_service(card: Card) -> CommentedMap:
    """The autoscaler's service: its image, the engine's socket, a healthcheck, a manager node."""
    service = CommentedMap()
    service["build"] = CommentedMap([("context", "."), ("dockerfile", f"{card.service}/Dockerfile"),
                                     ("args", CommentedMap([("BASE_IMAGE", BASE_IMAGE)]))])
    service["init"] = True
    service["environment"] = CommentedMap([("SERVICE_NAME", card.name), ("SERVICE_PORT", card.port)])
    service["volumes"] = CommentedSeq([f"{ENGINE_SOCKET}:{ENGINE_SOCKET}"])
    service["healthcheck"] = CommentedMap([
        ("test", http_health_test(card.port, 5)),
        ("interval", "10s"), ("timeout", "5s"), ("retries", 6), ("start_period", "20s"),
    ])
    service["deploy"] = CommentedMap([
        ("resources", CommentedMap([("limits", CommentedMap([("memory", card.ram_usage)]))])),
        ("placement", CommentedMap([("constraints", CommentedSeq([MANAGER_NODE]))])),
    ])
    service["restart"] = "unless-stopped"
    return service


def autoscales(cards: dict[str, Card], service_names: Any) -> list[str]:
    """The services among `service_names` whose cards have deploy.autoscaling."""
    return [
        name for name in service_names
        if name in cards and cards[name].deploy is not None and cards[name].deploy.autoscaling is not None
    ]
