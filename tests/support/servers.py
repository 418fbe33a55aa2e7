"""Start real HTTP servers for tests: on a free loopback port, polled until healthy, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# How every service runs, in its image and here: plain gunicorn from the service's folder, whose
# gunicorn.conf.py gives the port (SERVICE_PORT) and the threaded worker.
GUNICORN = [str(VENV_BIN / "gunicorn"), "server:app"]
SERVICE_FOLDERS = {
    "agent": REPO_ROOT / "services" / "agent",
    "openai_api_lm": REPO_ROOT / "services" / "openai_api_lm",
    "transformers_lm": REPO_ROOT / "services" / "transformers_lm",
    "prompted_skill": REPO_ROOT / "skills" / "prompted_skill",
    "autoscaler": REPO_ROOT / "services" / "autoscaler",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    """A server process started by `running_server`, with its base URL and log file."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_through_now(self, timeout_seconds: float = 30) -> str:
        """The log once it holds every line written so far: a marked GET /health goes to the server and
        its access line is awaited (a process writes its lines in order; a request's own lines come
        before its answer)."""
        mark = f"log-mark-{uuid.uuid4().hex}"
        requests.get(self.url(f"/health?{mark}"), timeout=10)
        deadline = time.monotonic() + timeout_seconds
        while mark not in (log := self.log()):
            assert time.monotonic() < deadline, f"{self.base_url} never logged its request {mark}"
            time.sleep(0.05)
        return log

    def url(self, path: str) -> str:
        return self.base_url + path


class ServerDiedError(RuntimeError):
    pass


def wait_until_healthy(server: RunningServer, health_path: str, timeout_seconds: float) -> None:
    """Poll `health_path` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerDiedError(f"server exited with {server.process.returncode}; its log:\n{server.log()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.url(health_path), timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{server.base_url}{health_path} not healthy after {timeout_seconds}s; log:\n{server.log()}")


def stop_process(process: subprocess.Popen, grace_seconds: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_seconds)


def service_server(
    service: str, env: Mapping[str, str], *, port: int | None = None, startup_timeout_seconds: float = 180
) -> contextlib.AbstractContextManager[RunningServer]:
    """One of our services (a key of SERVICE_FOLDERS) under gunicorn from its folder, on `port` (a free
    one by default) with `env` over this process's environment; polled on /health until it is ready."""
    port = port or free_port()
    return running_server(
        GUNICORN, port=port, cwd=SERVICE_FOLDERS[service], env={"SERVICE_PORT": str(port), **env},
        startup_timeout_seconds=startup_timeout_seconds,
    )


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    *,
    port: int,
    cwd: Path | str = REPO_ROOT,
    env: Mapping[str, str] | None = None,
    health_path: str = "/health",
    startup_timeout_seconds: float = 180,
) -> Iterator[RunningServer]:
    """Run `command` (which must listen on `port`) until the block ends; its output goes to a log file."""
    log_file = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        list(command),
        cwd=str(cwd),
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop_process reaches gunicorn's workers
    )
    server = RunningServer(process, f"http://127.0.0.1:{port}", Path(log_file.name))
    try:
        wait_until_healthy(server, health_path, startup_timeout_seconds)
        yield server
    finally:
        stop_process(process)
        log_file.close()
