"""The monitoring overlay of a distribution (`monitoring.yml`), generated from the cards.

It adds the monitoring card's service (`components/prometheus.yml`: Debian's Prometheus, built on
BASE_IMAGE by services/prometheus/Dockerfile) with SCRAPE_TARGETS listing every HTTP service of the
distribution (`job=host:port`, from each service's card), its volume, a healthcheck on Prometheus'
own `/-/ready` and the card's memory limit. It reads `.env_secret` as every service does, so its
scrapes carry the distribution's API key. Prometheus has no keys of its own, so it listens on its
container's loopback only (SERVICE_HOST=127.0.0.1): the metrics it holds are reached with
`docker compose exec prometheus ...`, or on this machine under `parley up --monitoring`, which runs
the same overlay.
"""

from __future__ import annotations

from typing import Iterable

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from parley.api_keys import secret_env_file
from parley.cards import Card
from parley.kinds import BASE_IMAGE, MONITORING, flow

MONITORING_OVERLAY = MONITORING
DATA_DIR = "/var/lib/parley/prometheus"
SCRAPE_INTERVAL = "5s"


def scrape_targets(cards: dict[str, Card], services: Iterable[str]) -> str:
    """`job=host:port, ...` for every HTTP service of the distribution that has a card."""
    entries = []
    for name in services:
        card = cards.get(name)
        if card is not None and card.connector.protocol == "http" and not card.is_monitoring:
            entries.append(f"{name}={name}:{card.port}")
    return ", ".join(entries)


def volume_name(card: Card) -> str:
    return f"{card.name}-data"


def monitoring_compose_service(card: Card, targets: str) -> CommentedMap:
    service = CommentedMap()
    service["build"] = CommentedMap([("context", "."), ("dockerfile", f"{card.service}/Dockerfile"),
                                     ("args", CommentedMap([("BASE_IMAGE", BASE_IMAGE)]))])
    service["init"] = True
    service["env_file"] = flow([secret_env_file()])
    service["environment"] = CommentedMap([
        ("SERVICE_HOST", "127.0.0.1"),
        ("SERVICE_PORT", card.port),
        ("SCRAPE_TARGETS", DoubleQuotedScalarString(targets)),
        ("SCRAPE_INTERVAL", SCRAPE_INTERVAL),
    ])
    service["volumes"] = CommentedSeq([f"{volume_name(card)}:{DATA_DIR}"])
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{card.port}/-/ready', timeout=5)"
    service["healthcheck"] = CommentedMap([
        ("test", flow(["CMD", "python3", "-c", probe])),
        ("interval", "10s"), ("timeout", "5s"), ("retries", 12), ("start_period", "30s"),
    ])
    service["deploy"] = CommentedMap([("resources", CommentedMap([("limits", CommentedMap([("memory", card.ram_usage)]))]))])
    service["restart"] = "unless-stopped"
    return service
