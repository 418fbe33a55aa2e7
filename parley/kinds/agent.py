"""The agent kind: Dream's agent (services/agent), which routes every turn through its
distribution's pipeline and keeps the dialogs.

Its card generates its port, healthcheck and memory limit in the base docker-compose.yml; in each
distribution's override its PIPELINE_CONFIG, its WAIT_HOSTS (every component of the distribution
it reaches, from their cards) and its `depends_on` (the skills, healthy); its dev.yml entry; and in
postgres.yml its STATE_URL and `depends_on` on the state store. The rest of its entries is
hand-written and kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

from parley.kinds import DEV, POSTGRES, DistContext, Kind, block, dev_entry, ensure_map, healthy, http_health_test, plain, set_if_changed

if TYPE_CHECKING:
    from parley.cards import Card

PACKAGE = "services/agent"


def parse_wait_hosts(value: str) -> list[str]:
    return [entry.strip() for entry in str(value).replace("\n", ",").split(",") if entry.strip()]


class Agent(Kind):
    name = "agent"
    description = "Dream's agent (services/agent): runs the pipeline for every turn and keeps the dialogs"
    group = "agent"
    package = PACKAGE
    first_port = 4242
    endpoints = ("", "api/dialogs", "api/user", "api/llms", "chat")
    routes_turns = True
    waited_for = False

    def healthcheck(self, card: "Card") -> CommentedMap:
        check = block({"test": None, "interval": "5s", "timeout": "5s", "retries": 24, "start_period": "10s"})
        check["test"] = http_health_test(card.port, 3)
        return check

    def update_base(self, entry: CommentedMap, card: "Card") -> None:
        set_if_changed(ensure_map(entry, "environment"), "SERVICE_PORT", card.port)
        set_if_changed(entry, "healthcheck", self.healthcheck(card))
        limits = ensure_map(ensure_map(ensure_map(entry, "deploy"), "resources"), "limits")
        set_if_changed(limits, "memory", card.ram_usage)

    def depends_on(self, card: "Card", ctx: DistContext) -> list[str]:
        return [skill.name for skill in ctx.skills]

    def update_override(self, entry: CommentedMap, card: "Card", ctx: DistContext) -> None:
        environment = ensure_map(entry, "environment")
        set_if_changed(environment, "PIPELINE_CONFIG", ctx.pipeline_config)
        old = environment.get("WAIT_HOSTS")
        hosts = ", ".join(f"{other.name}:{other.port}" for other in ctx.waited_for)
        if old is None or str(old) != hosts:
            quoted = SingleQuotedScalarString if isinstance(old, SingleQuotedScalarString) else DoubleQuotedScalarString
            environment["WAIT_HOSTS"] = quoted(hosts)
        wanted = self.depends_on(card, ctx)
        depends_on = entry.get("depends_on")
        if isinstance(depends_on, list):
            depends_on = healthy(depends_on)
        depends_on = depends_on if isinstance(depends_on, dict) else CommentedMap()
        for name in list(depends_on):
            if (name in ctx.cards or name in ctx.removed) and name not in wanted:
                del depends_on[name]
        for name in wanted:
            set_if_changed(depends_on, name, block({"condition": "service_healthy"}))
        if depends_on:
            entry["depends_on"] = depends_on
        else:
            entry.pop("depends_on", None)

    def overlay_service(self, card: "Card", overlay: str, ctx: DistContext) -> CommentedMap | None:
        if overlay == DEV:
            return dev_entry(card, [PACKAGE, "common", "assistant_dists"])
        if overlay == POSTGRES and ctx.store is not None:
            store = ctx.store.kind
            entry = CommentedMap()
            entry["environment"] = block({"STATE_URL": DoubleQuotedScalarString(store.state_url(ctx.store))})  # type: ignore[attr-defined]
            entry["depends_on"] = healthy([ctx.store.name])
            return entry
        return None


def register_kinds(register) -> None:
    register(Agent)


__all__ = ["Agent", "parse_wait_hosts", "plain"]
