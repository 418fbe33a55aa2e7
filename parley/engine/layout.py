"""Where the engine's files live (data root, pid file, log, socket, compose plugin, env file) and its one error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class DockerEngineError(RuntimeError):
    """Setting up, starting or stopping the Docker engine failed; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class EngineLayout:
    """Where the engine's files live; one object so tests and `status` agree on every path."""

    data_root: Path = Path("/var/lib/parley-docker")
    exec_root: Path = Path("/run/parley-docker")
    log_file: Path = Path("/var/log/parley-dockerd.log")
    socket: Path = Path("/var/run/docker.sock")
    plugin_dir: Path = Path("/usr/local/lib/docker/cli-plugins")
    env_file: Path = REPO_ROOT / ".cache" / "parley-engine.env"
    site_dir: Path = REPO_ROOT / "docker"

    @property
    def pid_file(self) -> Path:
        return self.exec_root / "dockerd.pid"

    @property
    def forward_policy_file(self) -> Path:
        return self.data_root / "parley-forward-policy"

    @property
    def base_rootfs(self) -> Path:
        return self.data_root.parent / "parley-docker-base-rootfs"

    @property
    def compose_plugin(self) -> Path:
        return self.plugin_dir / "docker-compose"
