"""`parley stack`: a Docker Swarm stack file for a distribution, from its compose files and cards.

The distribution's compose files (base, override and overlays such as cpu.yml) are merged by the
Compose binary (`docker compose config`), then turned into what `docker stack deploy` accepts: no
top-level `name`, no `build:` (each service runs the image Compose built for it, or the pushed copy
with `--push`), no `depends_on` or `restart` (Swarm ignores them; its restart policy replaces them),
`cpus` quoted, and a `deploy:` section per service from its card: replicas and placement (the
card's optional `deploy` section), memory limits (the compose files') and reservations (the card's
`ram_usage`), a restart policy, and rolling updates, start-first where the service allows it. An
agent that keeps its dialogs in SQLite (its volume) runs one replica, stop-first, on the node
labelled `parley-state=true`; with the postgres.yml overlay (STATE_URL=postgresql://...) the
database is that pinned, stateful service instead, and the agent runs its card's
`deploy.replicas`, start-first, anywhere. The agent is the only service with a published port.

An LLM stops without dropping a request: its `stop_grace_period` is its card's `connector.timeout`
(what its callers wait) plus a margin, and its GUNICORN_GRACEFUL_TIMEOUT the same timeout, so a
replica that is scaled away or updated finishes what it has (common/gunicorn_worker.py). An LLM
whose card has `deploy.autoscaling` starts `initial_replicas` and carries its bounds as service
labels (`parley.autoscaling.*`); the stack then gets the autoscaler (the distribution's
autoscaler.yml overlay, applied without being asked for), on a manager node with the engine's
socket, the one bind mount that travels to a swarm.

The API keys travel as the Docker secret `parley_api_keys` (`docker secret create`, external to
the stack), mounted at /run/secrets/parley_api_keys in every service but a database, which reads it
through PARLEY_API_KEYS_FILE: never as plain environment, whatever the compose files merged in
(.env_secret's PARLEY_API_KEYS is dropped from each service's environment).

A kernel without IPVS (as on some CI machines) has no Swarm virtual IPs or ingress routing mesh:
`--endpoint-mode dnsrr` then resolves a service name to every replica's address (DNS round robin)
and publishes the agent's port on the node itself (`mode: host`), so one agent replica per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from parley import tools
from parley.api_keys import DOCKER_SECRET
from parley.autoscaler_overlay import AUTOSCALER_OVERLAY, ENGINE_SOCKET, autoscales
from parley.cards import Card
from parley.repo import Repo
from services.autoscaler.policy import Bounds

STACK_COMPOSE_VERSION = "3.8"
DEFAULT_PROJECT = "parley"
# The node label that pins the agent (and so its state volume) to one node, and the one GPU models need.
STATE_NODE_LABEL = "parley-state"
GPU_NODE_LABEL = "parley-gpu"
# What a service may keep from the merged compose file; the rest is either rebuilt here (deploy,
# ports, image) or ignored by `docker stack deploy` (build, depends_on, restart, networks, ...).
KEPT_SERVICE_KEYS = (
    "command", "entrypoint", "environment", "healthcheck", "init", "user", "working_dir",
    "stop_grace_period", "stop_signal", "labels", "extra_hosts", "cap_add", "cap_drop", "ulimits", "tmpfs",
)
HEALTHCHECK_KEYS = ("test", "interval", "timeout", "retries", "start_period", "disable")
# Seconds Swarm waits beyond an LLM's graceful timeout before it kills the container: gunicorn's
# master needs them to stop its worker and exit after the drain.
STOP_MARGIN_SECONDS = 5
# Where a service finds the keys in a swarm (the secret's default mount), and the variables that
# would carry them as plain environment (never in a stack).
SECRET_MOUNT = f"/run/secrets/{DOCKER_SECRET}"
KEY_VARIABLES = ("PARLEY_API_KEYS", "PARLEY_API_KEYS_FILE")
EndpointMode = Literal["vip", "dnsrr"]


class StackError(ValueError):
    """A distribution that cannot become a stack; the message says why and how to fix it."""


@dataclass(frozen=True)
class StackOptions:
    """What `parley stack` was asked for."""

    dist: str
    overlays: tuple[str, ...] = ()
    endpoint_mode: EndpointMode = "vip"
    project: str = DEFAULT_PROJECT
    registry: str | None = None


@dataclass
class Stack:
    """The stack file's content and the images it runs (local build name -> name in the stack)."""

    document: dict[str, Any]
    images: dict[str, str] = field(default_factory=dict)
    compose_files: list[str] = field(default_factory=list)
    autoscaled: list[str] = field(default_factory=list)  # services the autoscaler scales


def compose_files(repo: Repo, dist: str, overlays: tuple[str, ...]) -> list[str]:
    """The distribution's compose files, base first, as `docker compose -f` takes them."""
    dist_dir = repo.path(f"assistant_dists/{dist}")
    if not dist_dir.is_dir():
        known = ", ".join(repo.distributions()) or "none"
        raise StackError(f"no distribution {dist!r} (assistant_dists/{dist}/); known: {known}")
    files = ["docker-compose.yml", f"assistant_dists/{dist}/docker-compose.override.yml"]
    for overlay in overlays:
        relative = f"assistant_dists/{dist}/{Path(overlay).name}"
        if not repo.path(relative).is_file():
            raise StackError(f"no overlay {relative}; the distribution has: {', '.join(sorted(p.name for p in dist_dir.glob('*.yml')))}")
        if Path(overlay).name == "dev.yml":
            raise StackError("dev.yml mounts this checkout's folders and publishes loopback ports: it does not travel to a swarm; leave it out")
        files.append(relative)
    return files


def merged_compose(repo: Repo, files: list[str], project: str) -> dict[str, Any]:
    """The files merged as Compose merges them (`docker compose config --format json`)."""
    try:
        return tools.merged_compose(repo.root, files, project=project)
    except tools.ComposeError as error:
        raise StackError(f"docker compose -f {' -f '.join(files)} config failed: {error.message}") from None


def build_stack(merged: dict[str, Any], cards: dict[str, Card], options: StackOptions) -> Stack:
    """The stack file for the merged compose document, with a deploy section per service from its card."""
    stack = Stack(document={})
    services = {}
    for name, service in merged.get("services", {}).items():
        card = cards.get(name)
        if card is None:
            raise StackError(f"compose service {name!r} has no card components/{name}.yml; every service needs one")
        services[name] = _stack_service(name, service, card, options, stack.images)
    volumes = {name: _stack_volume(volume or {}) for name, volume in (merged.get("volumes") or {}).items()}
    stack.document = {"version": STACK_COMPOSE_VERSION, "services": services}
    if volumes:
        stack.document["volumes"] = volumes
    if any("secrets" in service for service in services.values()):
        stack.document["secrets"] = {DOCKER_SECRET: {"external": True}}
    return stack


def _stack_service(name: str, service: dict[str, Any], card: Card, options: StackOptions, images: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {"image": _image(name, service, options, images)}
    for key in KEPT_SERVICE_KEYS:
        if service.get(key) not in (None, [], {}):
            result[key] = service[key]
    if "environment" in result:
        result["environment"] = {key: "" if value is None else str(value) for key, value in result["environment"].items()
                                 if key not in KEY_VARIABLES}
    if not card.is_state_store:
        # Mode 0444 (Swarm's default): each image runs as a user of its own, and each must read it.
        result["secrets"] = [{"source": DOCKER_SECRET, "target": DOCKER_SECRET}]
        result.setdefault("environment", {})["PARLEY_API_KEYS_FILE"] = SECRET_MOUNT
    if card.kind.runs_model and card.deploy and card.deploy.cpus:
        # The model's threads match the cores a replica is given: more threads than cores make every
        # step wait on descheduled threads, which slows generation by orders of magnitude on a busy node.
        # OMP_NUM_THREADS for torch (the transformers backend), THREADS for the llama_cpp backend.
        threads = str(max(1, int(card.deploy.cpus)))
        for variable in ("OMP_NUM_THREADS", "THREADS"):
            result.setdefault("environment", {}).setdefault(variable, threads)
    if card.is_llm:
        # A replica that is stopped (scaled away, updated) finishes what its callers still wait for.
        graceful = math.ceil(card.connector.timeout)
        result.setdefault("environment", {})["GUNICORN_GRACEFUL_TIMEOUT"] = str(graceful)
        result["stop_grace_period"] = f"{graceful + STOP_MARGIN_SECONDS}s"
    if "healthcheck" in result:
        result["healthcheck"] = {key: value for key, value in result["healthcheck"].items() if key in HEALTHCHECK_KEYS}
    shared_state = card.is_agent and state_is_shared(service)
    # An agent on a shared database keeps nothing in its (SQLite) volume: it goes, and so does the pin.
    mounts = [] if shared_state else [_volume_mount(name, mount) for mount in service.get("volumes") or []]
    if mounts:
        result["volumes"] = mounts
    # State lives in named volumes; the engine's socket (the autoscaler's) is the same on every manager.
    volumes = [mount for mount in mounts if not mount.startswith(f"{ENGINE_SOCKET}:")]
    if card.is_agent:
        # The one way in: the agent's port, on every node (ingress) or on the agent's node (host).
        mode = "host" if options.endpoint_mode == "dnsrr" else "ingress"
        result["ports"] = [{"target": card.port, "published": card.port, "protocol": "tcp", "mode": mode}]
    result["deploy"] = _deploy(service, card, options, keeps_state=(card.is_agent and not shared_state) or bool(volumes))
    return result


def state_is_shared(service: dict[str, Any]) -> bool:
    """Whether the agent keeps its dialogs in a database every replica reaches (STATE_URL=postgresql://)."""
    url = str((service.get("environment") or {}).get("STATE_URL") or "")
    return url.lower().startswith(("postgresql://", "postgres://"))


def _image(name: str, service: dict[str, Any], options: StackOptions, images: dict[str, str]) -> str:
    """A built service runs the image Compose built (`<project>-<service>`, or its `image:`)."""
    if "build" not in service:
        if not service.get("image"):
            raise StackError(f"service {name!r} has neither image nor build")
        return service["image"]
    local = service.get("image") or f"{options.project}-{name}"
    if options.registry is None:
        images[local] = local
        return local
    repository = local.rsplit("/", 1)[-1].split(":", 1)[0]
    tag = local.split(":", 1)[1] if ":" in local.rsplit("/", 1)[-1] else "latest"
    images[local] = f"{options.registry.rstrip('/')}/{repository}:{tag}"
    return images[local]


def _volume_mount(service_name: str, mount: Any) -> str:
    if isinstance(mount, str):
        return mount
    engine_socket = mount.get("type") == "bind" and mount.get("source") == ENGINE_SOCKET
    if mount.get("type") != "volume" and not engine_socket:
        raise StackError(
            f"service {service_name!r} mounts {mount.get('source')} ({mount.get('type')}): only named volumes "
            f"(and the engine's socket {ENGINE_SOCKET}) travel to a swarm"
        )
    return f"{mount['source']}:{mount['target']}" + (":ro" if mount.get("read_only") else "")


def _stack_volume(volume: dict[str, Any]) -> dict[str, Any]:
    # Compose names volumes `<project>_<name>`; the stack names them `<stack>_<name>` itself.
    return {key: value for key, value in volume.items() if key in ("driver", "driver_opts", "labels", "external")}


def _deploy(service: dict[str, Any], card: Card, options: StackOptions, keeps_state: bool) -> dict[str, Any]:
    compose_deploy = service.get("deploy") or {}
    replicas = card.deploy.starting_replicas if card.deploy else 1
    if card.is_agent and keeps_state:
        replicas = 1  # its card's replicas are for shared state (postgres.yml)
    if keeps_state and replicas != 1:
        raise StackError(f"components/{card.name}.yml: deploy.replicas: {card.name} keeps state in a volume, so it runs 1 replica")
    # Two copies of a stateful service must never write its volume at once, a host-mode port cannot
    # be bound twice on one node, and two autoscalers would scale at once: those stop the old task
    # first; the rest start the new one first.
    order = "stop-first" if keeps_state or card.is_autoscaler else "start-first"
    deploy: dict[str, Any] = {
        "mode": "replicated",
        "replicas": replicas,
        "endpoint_mode": options.endpoint_mode,
        "resources": _resources(compose_deploy.get("resources") or {}, card),
        "restart_policy": {"condition": "any", "delay": "5s", "window": "60s"},
        "update_config": {"parallelism": 1, "order": order, "failure_action": "rollback", "monitor": "20s"},
        "rollback_config": {"parallelism": 1, "order": order},
    }
    constraints = list(card.deploy.placement) if card.deploy else []
    constraints += (compose_deploy.get("placement") or {}).get("constraints") or []
    if card.gpu_usage:
        constraints.append(f"node.labels.{GPU_NODE_LABEL} == true")
    if keeps_state:
        constraints.append(f"node.labels.{STATE_NODE_LABEL} == true")
    placement: dict[str, Any] = {}
    if constraints:
        placement["constraints"] = list(dict.fromkeys(constraints))
    if card.deploy and card.deploy.max_replicas_per_node:
        placement["max_replicas_per_node"] = card.deploy.max_replicas_per_node
    if card.is_agent and options.endpoint_mode == "dnsrr" and replicas > 1:
        placement["max_replicas_per_node"] = 1  # its port is bound on the node itself (mode: host)
    if placement:
        deploy["placement"] = placement
    autoscaling = card.deploy.autoscaling if card.deploy else None
    if autoscaling is not None:
        # The bounds travel as service labels: the autoscaler reads them at every look, and
        # `docker service update --label-add parley.autoscaling.max_replicas=4 ...` changes them.
        bounds = Bounds(
            min_replicas=autoscaling.min_replicas, max_replicas=autoscaling.max_replicas,
            target_ongoing_requests=autoscaling.target_ongoing_requests, upscale_delay_s=autoscaling.upscale_delay_s,
            downscale_delay_s=autoscaling.downscale_delay_s, port=card.port,
        )
        deploy["labels"] = bounds.labels()
    return deploy


def _resources(resources: dict[str, Any], card: Card) -> dict[str, Any]:
    """Limits from the compose files (memory, and cpus quoted as the stack schema wants) or the card's
    deploy.cpus, the card's ram_usage as the memory reservation, so the scheduler places a replica
    only where it fits. No CPU reservation: a start-first update runs one replica more for a while."""
    limits = {}
    for key, value in (resources.get("limits") or {}).items():
        if key == "memory":
            limits["memory"] = _memory(value)
        elif key == "cpus":
            limits["cpus"] = str(value)
    if "memory" not in limits:
        limits["memory"] = card.ram_usage
    if card.deploy and card.deploy.cpus:
        limits["cpus"] = f"{card.deploy.cpus:g}"
    return {"limits": limits, "reservations": {"memory": card.ram_usage}}


def _memory(value: Any) -> str:
    """Compose's byte count as the size it was written as (268435456 -> 256M)."""
    text = str(value)
    if not text.isdigit():
        return text
    size = int(text)
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return text


def stack_header(options: StackOptions) -> str:
    command = f"parley stack {options.dist}"
    command += "".join(f" --overlay {overlay}" for overlay in options.overlays)
    if options.endpoint_mode != "vip":
        command += f" --endpoint-mode {options.endpoint_mode}"
    if options.project != DEFAULT_PROJECT:
        command += f" --project {options.project}"
    if options.registry:
        command += f" --push {options.registry}"
    return (
        f"# Generated by `{command}` from the distribution's compose files and components/*.yml; regenerate, do not edit.\n"
        f"# Deploy: docker stack deploy -c FILE STACK (see the README's \"Beyond one machine\").\n"
    )


def make_stack(repo: Repo, options: StackOptions) -> Stack:
    """Load the cards, merge the compose files and build the stack (with the autoscaler overlay
    when a service of the distribution autoscales)."""
    cards = repo.load_valid_cards()
    files = compose_files(repo, options.dist, options.overlays)
    merged = merged_compose(repo, files, options.project)
    scaled = autoscales(cards, merged.get("services") or {})
    if scaled and not any(Path(file).name == AUTOSCALER_OVERLAY for file in files):
        overlay = repo.dist_file(options.dist, AUTOSCALER_OVERLAY)
        if not repo.path(overlay).is_file():
            raise StackError(f"{', '.join(scaled)} autoscale(s) but {overlay} is missing: run `parley generate`")
        files.append(overlay)
        merged = merged_compose(repo, files, options.project)
    stack = build_stack(merged, cards, options)
    stack.compose_files = files
    stack.autoscaled = scaled
    return stack


def push_images(images: dict[str, str], say: Callable[[str], None]) -> None:
    """Tag each locally built image with its registry name and push it; `say` hears of each push."""
    for local, remote in images.items():
        if not tools.docker_image_exists(local):
            raise StackError(f"no local image {local}: build the distribution first (docker compose -p PROJECT ... build)")
        say(f"==> docker push {remote}")
        tools.run_tool(["docker", "tag", local, remote], what=f"tagging {local} as {remote}")
        tools.run_tool(["docker", "push", remote], what=f"pushing {remote}")
