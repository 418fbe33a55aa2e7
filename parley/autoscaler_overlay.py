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

AUTOSCALER_OVERLAY = "autoscaler.yml"
# The engine's socket, at the same path on every node; the only bind mount that travels to a swarm.
ENGINE_SOCKET = "/var/run/docker.sock"
MANAGER_NODE = "node.role == manager"
BASE_IMAGE = "${BASE_IMAGE:-python:3.11-slim}"


def _flow(items: list[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def autoscaler_compose_service(card: Card) -> CommentedMap:
    """The autoscaler's service: its image, the engine's socket, a healthcheck, a manager node."""
    service = CommentedMap()
    service["build"] = CommentedMap([("context", "."), ("dockerfile", f"{card.service}/Dockerfile"),
                                     ("args", CommentedMap([("BASE_IMAGE", BASE_IMAGE)]))])
    service["init"] = True
    service["environment"] = CommentedMap([("SERVICE_NAME", card.name), ("SERVICE_PORT", card.port)])
    service["volumes"] = CommentedSeq([f"{ENGINE_SOCKET}:{ENGINE_SOCKET}"])
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{card.port}/health', timeout=5)"
    service["healthcheck"] = CommentedMap([
        ("test", _flow(["CMD", "python3", "-c", probe])),
        ("interval", "10s"), ("timeout", "5s"), ("retries", 6), ("start_period", "20s"),
    ])
    service["deploy"] = CommentedMap([
        ("resources", CommentedMap([("limits", CommentedMap([("memory", card.ram_usage)]))])),
        ("placement", CommentedMap([("constraints", CommentedSeq([MANAGER_NODE]))])),
    ])
    service["restart"] = "unless-stopped"
    return service


def update_autoscaler_overlay(document: CommentedMap, cards: dict[str, Card], services: CommentedMap) -> None:
    """Edit a distribution's autoscaler.yml in place: the autoscaler card's service (none without
    the card). Hand-written keys and comments stay."""
    autoscalers = sorted((card for card in cards.values() if card.is_autoscaler), key=lambda card: card.name)
    names = {card.name for card in autoscalers}
    for name in list(services):
        card = cards.get(name)
        if card is not None and card.is_autoscaler and name not in names:
            del services[name]
    if autoscalers:
        services[autoscalers[0].name] = autoscaler_compose_service(autoscalers[0])


def autoscales(cards: dict[str, Card], service_names: Any) -> list[str]:
    """The services among `service_names` whose cards have deploy.autoscaling."""
    return [
        name for name in service_names
        if name in cards and cards[name].deploy is not None and cards[name].deploy.autoscaling is not None
    ]
