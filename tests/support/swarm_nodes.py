"""A second Docker node on this machine, and a registry both nodes pull from: for the two-node swarm test.

`node_network()` makes a network namespace joined to this one by a veth pair, with addresses of
its own (10.231.0.1 here, 10.231.0.2 there): the second node's "machine". `SecondEngine` runs a
second dockerd inside it: its own data root, exec root, socket, pid file and cgroup parent, in a
mount and UTS namespace of its own (so its mounts vanish with it, and it has its own hostname),
with its default bridge on a subnet of its own. `TlsRegistry` runs Debian's docker-registry on the
host's end of the veth, with a certificate made for that address and trusted by both engines
(/etc/docker/certs.d/ADDRESS:PORT/ca.crt, which dockerd reads at each pull and push), so no
engine needs `--insecure-registry` or a restart.

Everything made here is removed by the `remove`/`stop` methods, also after a failure half-way:
the engine's processes and those of its containers (found by its cgroup parent), its containers,
networks, volumes and swarm state, the namespace (and with it the veth pair), the registry, its
certificate and configuration. Two caches stay, as the first engine's data root does, so a second
run pulls and pushes only what changed: the second engine's images (`<root>/data`, once the engine
has been emptied and stopped cleanly; after a failure half-way the whole data root goes) and the
registry's storage (garbage-collected). Deleting them costs minutes on a disk that discards on
unlink, and keeping them saves as much at the next run. Needs root, iproute2, util-linux (nsenter,
unshare), openssl and docker-registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CERTS_D = Path("/etc/docker/certs.d")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeError(RuntimeError):
    """Setting up the second node or the registry failed; the message says what failed."""


def sh(*command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    completed = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise NodeError(f"`{' '.join(command)}` exited with {completed.returncode}: {(completed.stderr or completed.stdout).strip()}")
    return completed


@dataclass(frozen=True)
class NodeNetwork:
    """A network namespace joined to this one by a veth pair (the second node's machine and its cable)."""

    namespace: str = "parley-node2"
    host_link: str = "parley-n2-host"
    node_link: str = "parley-n2-node"
    host_address: str = "10.231.0.1"
    node_address: str = "10.231.0.2"
    prefix_length: int = 30

    def exists(self) -> bool:
        return Path(f"/run/netns/{self.namespace}").exists() or Path(f"/sys/class/net/{self.host_link}").exists()

    def create(self) -> None:
        sh("ip", "netns", "add", self.namespace)
        sh("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.node_link)
        sh("ip", "link", "set", self.node_link, "netns", self.namespace)
        sh("ip", "addr", "add", f"{self.host_address}/{self.prefix_length}", "dev", self.host_link)
        sh("ip", "link", "set", self.host_link, "up")
        inside = ("ip", "netns", "exec", self.namespace)
        sh(*inside, "ip", "addr", "add", f"{self.node_address}/{self.prefix_length}", "dev", self.node_link)
        sh(*inside, "ip", "link", "set", self.node_link, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        # The node's default route is the cable: what it reaches of the world is the host's end.
        sh(*inside, "ip", "route", "add", "default", "via", self.host_address)

    def remove(self) -> list[str]:
        """Delete the namespace and the veth pair; what was removed."""
        removed = []
        if Path(f"/sys/class/net/{self.host_link}").exists():
            sh("ip", "link", "delete", self.host_link, check=False)
            removed.append(f"veth {self.host_link}")
        if Path(f"/run/netns/{self.namespace}").exists():
            sh("ip", "netns", "delete", self.namespace, check=False)
            removed.append(f"netns {self.namespace}")
        return removed


@dataclass
class SecondEngine:
    """A dockerd in the node's namespace, with roots, socket, cgroup parent and bridge of its own."""

    network: NodeNetwork
    root: Path = Path("/var/lib/parley-node2")
    exec_root: Path = Path("/run/parley-node2")
    hostname: str = "parley-node2"
    bridge_subnet: str = "172.31.231.1/24"
    log_path: Path | None = None  # default: dockerd.log in root
    process: subprocess.Popen | None = None
    emptied: bool = False  # stopped with no container, network, volume or swarm state: its images may stay

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def log_file(self) -> Path:
        return self.log_path or self.root / "dockerd.log"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.hostname}"

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        completed = subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], capture_output=True, text=True, timeout=timeout)
        if check and completed.returncode != 0:
            raise NodeError(f"`docker {' '.join(args)}` on {self.hostname} exited with {completed.returncode}: {completed.stderr.strip()}")
        return completed.stdout.strip()

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        return subprocess.run(["docker", "-H", f"unix://{self.socket}", "info"], capture_output=True, timeout=10).returncode == 0

    def start(self, timeout_seconds: float = 120) -> None:
        """Start the engine, outside any swarm (a swarm it belonged to in an earlier run is forgotten)."""
        for folder in (self.data_root, self.exec_root, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.data_root / "swarm", ignore_errors=True)
        self.emptied = False
        dockerd = [
            "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.exec_root / "dockerd.pid"),
            "--host", f"unix://{self.socket}",
            "--storage-driver", "overlay2",
            "--cgroup-parent", self.cgroup_parent,
            "--bip", self.bridge_subnet,
            "--shutdown-timeout", "30",
        ]
        # Only the network namespace is the node's; a mount and UTS namespace of its own keep its
        # mounts private (gone with it) and give it a hostname; /sys, and so the cgroups, stay.
        command = [
            "nsenter", f"--net=/run/netns/{self.network.namespace}",
            "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *dockerd,
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_seconds
        while not self.answers():
            if self.process.poll() is not None:
                raise NodeError(f"the second dockerd exited with {self.process.returncode}; {self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise NodeError(f"the second dockerd did not answer within {timeout_seconds:.0f}s; {self.log_file}:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout_seconds: float = 60) -> bool:
        """Stop the engine as an operator would (SIGTERM: it stops its containers, then exits); True once it has."""
        if self.process is None or self.process.poll() is not None:
            return True
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def empty(self) -> None:
        """Leave the engine with nothing but its images, and stopped: started afresh (without its
        swarm state), its containers, networks, volumes and dangling images removed, then stopped."""
        self.stop()
        self.start()
        for kind in ("container", "network", "volume"):
            self.docker(kind, "prune", "--force", timeout=300)
        self.docker("image", "prune", "--force", timeout=300)
        if not self.stop() or self.namespace_pids() or self.container_pids():
            raise NodeError(f"the second engine did not stop cleanly; {self.log_file}:\n{self.log_tail()}")
        shutil.rmtree(self.data_root / "swarm", ignore_errors=True)
        self.emptied = True

    def container_pids(self) -> list[int]:
        """Every process in the engine's cgroup parent: its containers' processes."""
        pids: set[int] = set()
        for procs in CGROUP_ROOT.glob(f"*{self.cgroup_parent}/**/cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
        return sorted(pids)

    def namespace_pids(self) -> list[int]:
        """Every process in the node's network namespace: dockerd, containerd, the shims."""
        listing = sh("ip", "netns", "pids", self.network.namespace, check=False)
        return [int(pid) for pid in listing.stdout.split() if pid.isdigit()]

    def remove(self) -> list[str]:
        """Kill whatever of the engine still runs, drop its cgroups, mounts and exec root, and its data
        root too unless `empty()` left only images in it; what was removed."""
        removed = []
        if not self.stop(timeout_seconds=30):
            removed.append("dockerd (killed)")
        for _ in range(3):
            pids = self.namespace_pids() + self.container_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            removed.append(f"{len(pids)} process(es)")
            time.sleep(1)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        for cgroup in sorted(CGROUP_ROOT.glob(f"*{self.cgroup_parent}"), reverse=True):
            for folder in sorted((path for path in cgroup.rglob("*") if path.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
                removed.append(f"cgroup {cgroup}")
        for root in (self.exec_root, self.root):
            for mount_point in reversed(mounts_under(root)):
                sh("umount", "-l", mount_point, check=False)
        kept = [self.data_root] if self.emptied else []
        for path in [self.exec_root, *(child for child in sorted(self.root.glob("*")) if child not in kept)]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
        if not kept and self.root.exists():
            with contextlib.suppress(OSError):
                self.root.rmdir()
        return removed

    def leftovers(self) -> list[str]:
        """What of the engine is still here, but for its image cache."""
        found = [f"pid {pid}" for pid in self.namespace_pids() + self.container_pids()]
        found += [str(path) for path in (self.exec_root, *self.root.glob("*")) if path.exists() and path != self.data_root]
        if self.data_root.exists() and not self.emptied:
            found.append(str(self.data_root))
        return found


def mounts_under(root: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1].startswith(str(root))]
    return []


@dataclass
class TlsRegistry:
    """Debian's docker-registry on `address:port`, with a certificate for that address that every
    engine on this machine trusts (/etc/docker/certs.d)."""

    address: str
    port: int = 5443
    root: Path = Path("/var/lib/parley-test-registry")
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def trust_dir(self) -> Path:
        return CERTS_D / self.name

    def start(self, timeout_seconds: float = 60) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise NodeError("docker-registry is not installed: apt-get install docker-registry (make test-multinode does)")
        self.root.mkdir(parents=True, exist_ok=True)
        cert, key = self.root / "registry.crt", self.root / "registry.key"
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=parley-test-registry",
           "-addext", f"subjectAltName=IP:{self.address}", "-keyout", str(key), "-out", str(cert))
        self.trust_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cert, self.trust_dir / "ca.crt")
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root / 'storage'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.name}', tls: {{certificate: {cert}, key: {key}}}}}\n"
        )
        with open(self.root / "registry.log", "ab") as log:
            self.process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                with urllib.request.urlopen(f"https://{self.name}/v2/", timeout=3, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.root / "registry.log").read_text(errors="replace")[-2000:]
                raise NodeError(f"the registry on {self.name} did not answer; its log:\n{log_text}")
            time.sleep(0.3)

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def stop(self) -> list[str]:
        """Stop the registry and remove its certificate, its trust and its configuration; its storage
        stays, garbage-collected (the blobs no tag needs are deleted)."""
        removed = []
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            removed.append("registry")
        config = self.root / "config.yml"
        if config.is_file() and self.storage.is_dir():
            sh("docker-registry", "garbage-collect", "--delete-untagged", str(config), check=False, timeout=300)
        if self.trust_dir.exists():
            shutil.rmtree(self.trust_dir, ignore_errors=True)
            removed.append(str(self.trust_dir))
        for path in self.root.glob("*"):
            if path != self.storage:
                path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
        return removed

    def leftovers(self) -> list[str]:
        found = ["registry process"] if self.process is not None and self.process.poll() is None else []
        found += [str(path) for path in (self.trust_dir, *self.root.glob("*")) if path.exists() and path != self.storage]
        return found


@contextlib.contextmanager
def second_node(network: NodeNetwork, engine: SecondEngine, registry: TlsRegistry) -> Iterator[None]:
    """The namespace, the registry and the second engine, for the block; all removed after, also on
    failure (but for the caches: see the module's docstring)."""
    if network.exists():
        raise NodeError(f"{network.namespace} or {network.host_link} exists already: an earlier run left it; "
                        f"remove it (ip netns delete {network.namespace}; ip link delete {network.host_link})")
    try:
        network.create()
        registry.start()
        engine.start()
        yield
    finally:
        engine.remove()
        registry.stop()
        network.remove()
