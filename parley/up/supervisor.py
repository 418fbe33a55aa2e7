"""`parley up`'s supervisor: start planned services in dependency order, wait for each on its health
check (/health, or the path its compose healthcheck asks), stop them all.

Each service runs in its own process group (so a stop reaches its workers too) and dies with us
(PR_SET_PDEATHSIG). Its output is read line by line: the last lines are kept for the message when it
dies, and every line goes to the caller's `SupervisorOutput` (the command prints them; tests keep
them quiet). Nothing here prints.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from parley.repo import Repo
from parley.up.plan import ServicePlan, UpError, plan_distribution

# Our own /health polls carry this User-Agent, so their access-log lines can be left out of the output.
HEALTH_USER_AGENT = "parley-up-health"
STOP_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.5


class SupervisorOutput:
    """What the supervisor tells as it runs; this one tells nothing (`parley up` passes one that prints)."""

    def service_line(self, name: str, line: str) -> None:
        """A line a service printed; called from one thread per service."""

    def note(self, text: str) -> None:
        """What the supervisor does: a service starts, becomes healthy, the services stop."""

    def ready(self, running: RunningDistribution) -> None:
        """Every service is healthy."""


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

    def watch(self) -> None:
        """Block until a service dies (UpError naming it); Ctrl-C or SIGTERM ends it as KeyboardInterrupt."""
        while True:
            self.check_alive()
            time.sleep(POLL_SECONDS)


def port_in_use(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                return True
    return False


def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pump(service: RunningService, output: SupervisorOutput) -> None:
    assert service.process.stdout is not None
    for raw in service.process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        if HEALTH_USER_AGENT in line:
            continue
        service.lines.append(line)
        output.service_line(service.plan.name, line)


def _start(plan: ServicePlan, output: SupervisorOutput) -> RunningService:
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
    request = urllib.request.Request(service.plan.url + service.plan.health_path, headers={"User-Agent": HEALTH_USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, an error status, a cut answer
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
def run_services(
    dist: str, plans: list[ServicePlan], *, startup_timeout: float = 600.0, output: SupervisorOutput | None = None
) -> Iterator[RunningDistribution]:
    """Start the planned services in dependency order, wait until all are healthy, yield, then stop them all.

    Raises UpError (having stopped whatever it started) when a port is taken, a service dies or a
    service is not healthy within `startup_timeout` seconds.
    """
    output = output or SupervisorOutput()
    for plan in plans:
        if port_in_use(plan.port):
            raise UpError(
                f"port {plan.port} of service {plan.name} is already in use: stop what listens there "
                f"(`ss -ltnp 'sport = :{plan.port}'` shows it) or run `parley up --free-ports`"
            )
    started: list[RunningService] = []
    try:
        healthy: set[str] = set()
        waiting: dict[str, RunningService] = {}
        pending = list(plans)
        while pending or waiting:
            for plan in list(pending):
                if all(dependency in healthy for dependency in plan.depends_on):
                    pending.remove(plan)
                    output.note(f"starting {plan.name} on {plan.url}: {shlex.join(plan.command)}")
                    service = _start(plan, output)
                    started.append(service)
                    waiting[plan.name] = service
            for name, service in list(waiting.items()):
                code = service.process.poll()
                if code is not None:
                    raise UpError(
                        f"service {name} exited with code {code} before it became healthy on {service.plan.url}{service.plan.health_path}; "
                        f"its last lines:\n{service.last_lines()}"
                    )
                if _healthy(service):
                    healthy.add(name)
                    del waiting[name]
                    output.note(f"{name} is healthy on {service.plan.url} after {time.monotonic() - service.started_at:.1f}s")
                elif time.monotonic() - service.started_at > startup_timeout:
                    raise UpError(
                        f"service {name} did not become healthy on {service.plan.url}{service.plan.health_path} within {startup_timeout:.0f}s; "
                        f"its last lines:\n{service.last_lines()}"
                    )
            time.sleep(POLL_SECONDS)
        # in plan order (dependencies first), as the services were planned
        by_name = {service.plan.name: service for service in started}
        running = RunningDistribution(dist, {plan.name: by_name[plan.name] for plan in plans})
        output.ready(running)
        yield running
    finally:
        if started:
            output.note("stopping " + ", ".join(service.plan.name for service in reversed(started)))
        stop_services(started)


@contextlib.contextmanager
def run_distribution(
    repo: Repo,
    dist: str,
    *,
    free_ports: bool = False,
    overlays: list[str] | None = None,
    startup_timeout: float = 600.0,
    state_dir: Path | None = None,
    output: SupervisorOutput | None = None,
    monitoring: bool = False,
) -> Iterator[RunningDistribution]:
    """Plan the distribution (parley.up.plan) and run it (`run_services`): what `parley up` does, for tests."""
    plans = plan_distribution(repo, dist, overlays=overlays, free_ports=free_ports, state_dir=state_dir, monitoring=monitoring)
    with run_services(dist, plans, startup_timeout=startup_timeout, output=output) as running:
        yield running
