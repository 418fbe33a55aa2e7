"""A distribution's pipeline (`pipeline_conf.json`, Dream's format) parsed into services and their order.

Services are grouped (annotators, skill_selectors, skills, candidate_annotators, response_selectors,
response_annotators, ...) and named `group.service`; `previous_services` name a group (all of its
services) or one service. `last_chance_service` and `timeout_service` are the special answers given
when no skill answered or the turn ran out of time. Every name the agent must resolve (connector
class, formatter, state manager method) is checked here, so a typo fails at startup, not mid-dialog.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.validation import StartupError
from services.agent import connectors, formatters
from services.agent.state_methods import STATE_METHODS

SPECIAL_SERVICES = ("last_chance_service", "timeout_service")
DEFAULT_HTTP_TIMEOUT = 5.0


class PipelineError(StartupError, ValueError):
    """A pipeline_conf.json the agent cannot run; the message names the service and the key."""


@dataclass(frozen=True)
class Connector:
    protocol: str  # "http" or "python"
    url: str | None = None
    timeout: float = DEFAULT_HTTP_TIMEOUT
    class_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the rest of a python connector's keys


@dataclass(frozen=True)
class PipelineService:
    name: str  # "group.service", or the key of a top-level service
    group: str | None
    connector: Connector
    previous_services: tuple[str, ...] = ()
    required_previous_services: tuple[str, ...] = ()
    state_manager_method: str | None = None
    dialog_formatter: str | None = None
    response_formatter: str | None = None
    tags: tuple[str, ...] = ()
    # What a prompted skill is for (its pipeline entry's `goals`, generated from its card): what
    # the description-based skill selector ranks against a turn.
    goals: str | None = None

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def is_selector(self) -> bool:
        return "selector" in self.tags or self.group == "skill_selectors"


@dataclass(frozen=True)
class Pipeline:
    services: tuple[PipelineService, ...]
    last_chance: PipelineService | None
    timeout: PipelineService | None
    metadata: dict[str, Any]

    def service_names(self) -> list[str]:
        return [service.name for service in self.services]


def load_pipeline(path: Path) -> Pipeline:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"PIPELINE_CONFIG {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"PIPELINE_CONFIG {str(path)!r} is not JSON: {error}") from None
    return parse_pipeline(data)


def parse_pipeline(data: Any) -> Pipeline:
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise PipelineError('a pipeline is a JSON object with a "services" object')
    named_connectors = data.get("connectors") or {}
    services: list[PipelineService] = []
    special: dict[str, PipelineService] = {}
    for key, entry in data["services"].items():
        if not isinstance(entry, dict):
            raise PipelineError(f"services.{key} must be an object")
        if "connector" in entry:  # a top-level service, not a group
            service = _parse_service(key, None, entry, named_connectors)
            if service is None:
                continue
            if key in SPECIAL_SERVICES:
                special[key] = service
            else:
                services.append(service)
            continue
        for name, service_entry in entry.items():
            if not isinstance(service_entry, dict):
                raise PipelineError(f"services.{key}.{name} must be an object")
            service = _parse_service(f"{key}.{name}", key, service_entry, named_connectors)
            if service is not None:
                services.append(service)
    services = _resolve_previous_services(services)
    _check_acyclic(services)
    return Pipeline(tuple(services), special.get("last_chance_service"), special.get("timeout_service"), data.get("metadata") or {})


def _parse_service(name: str, group: str | None, entry: dict, named_connectors: dict) -> PipelineService | None:
    if entry.get("is_enabled", True) is False:
        return None
    raw = entry.get("connector")
    if isinstance(raw, str):
        if raw not in named_connectors:
            raise PipelineError(f"services.{name}.connector names {raw!r}, which is not in the pipeline's connectors")
        raw = named_connectors[raw]
    if not isinstance(raw, dict):
        raise PipelineError(f"services.{name}.connector must be an object")
    protocol = raw.get("protocol")
    if protocol == "http":
        if not isinstance(raw.get("url"), str) or not raw["url"].startswith(("http://", "https://")):
            raise PipelineError(f"services.{name}.connector.url must be an http(s) URL")
        timeout = raw.get("timeout", DEFAULT_HTTP_TIMEOUT)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise PipelineError(f"services.{name}.connector.timeout must be a positive number of seconds")
        connector = Connector("http", url=raw["url"], timeout=float(timeout))
    elif protocol == "python":
        class_name = raw.get("class_name")
        if connectors.python_connector(class_name) is None:
            raise PipelineError(
                f"services.{name}.connector.class_name {class_name!r} is not one of the agent's python connectors: "
                + ", ".join(connectors.PYTHON_CONNECTORS)
            )
        options = {k: v for k, v in raw.items() if k not in ("protocol", "class_name")}
        connector = Connector("python", class_name=class_name, options=options)
    else:
        raise PipelineError(f"services.{name}.connector.protocol must be \"http\" or \"python\", not {protocol!r}")
    for key, known, knows in (
        ("dialog_formatter", formatters.DIALOG_FORMATTERS, formatters.knows_dialog_formatter),
        ("response_formatter", formatters.RESPONSE_FORMATTERS, None),
        ("state_manager_method", STATE_METHODS, None),
    ):
        value = entry.get(key)
        if value is not None and not (knows(value) if knows else formatters.short_name(value) in known):
            raise PipelineError(f"services.{name}.{key} {value!r} is not one the agent knows: {', '.join(known)}")
    goals = entry.get("goals")
    if goals is not None and (not isinstance(goals, str) or not goals.strip()):
        raise PipelineError(f"services.{name}.goals must be a non-empty text: what the skill is for")
    return PipelineService(
        name=name,
        group=group,
        connector=connector,
        previous_services=tuple(entry.get("previous_services") or ()),
        required_previous_services=tuple(entry.get("required_previous_services") or ()),
        state_manager_method=entry.get("state_manager_method"),
        dialog_formatter=entry.get("dialog_formatter"),
        response_formatter=entry.get("response_formatter"),
        tags=tuple(entry.get("tags") or ()),
        goals=goals.strip() if goals else None,
    )


def _resolve_previous_services(services: list[PipelineService]) -> list[PipelineService]:
    """Expand group names in previous_services into the group's enabled services."""
    by_name = {service.name: service for service in services}
    groups: dict[str, list[str]] = {}
    for service in services:
        if service.group:
            groups.setdefault(service.group, []).append(service.name)

    def expand(service: PipelineService, names: tuple[str, ...]) -> tuple[str, ...]:
        resolved: list[str] = []
        for name in names:
            if name in by_name:
                resolved.append(name)
            elif name in groups:
                resolved.extend(groups[name])
            # A name of a disabled service or of an absent group constrains nothing (as in Dream).
        return tuple(dict.fromkeys(n for n in resolved if n != service.name))

    resolved_services = []
    for service in services:
        previous = expand(service, service.previous_services)
        required = expand(service, service.required_previous_services)
        resolved_services.append(
            PipelineService(**{**service.__dict__, "previous_services": tuple(dict.fromkeys(previous + required)),
                               "required_previous_services": required})
        )
    return resolved_services


def _check_acyclic(services: list[PipelineService]) -> None:
    done: set[str] = set()
    remaining = {service.name: set(service.previous_services) for service in services}
    while remaining:
        ready = [name for name, previous in remaining.items() if previous <= done]
        if not ready:
            raise PipelineError("previous_services form a cycle among: " + ", ".join(sorted(remaining)))
        for name in ready:
            done.add(name)
            del remaining[name]
