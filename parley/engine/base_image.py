"""What image builds need on this machine: a base image, the site's supplies, and compose's environment.

Where no image registry is reachable, the base image is a minimal Debian that debootstrap builds
from the machine's own apt mirror, trusting the machine's extra CA certificates; elsewhere builds
pull the Dockerfiles' default. The site supplies are the torch CPU wheel from pip's find-links
folder and those CA certificates (see docker/README.md). The env file tells compose which base
image to build on (`BASE_IMAGE`). Nothing here prints: what each step finds goes to `progress.say`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from parley.engine.layout import EngineLayout
from parley.progress import Progress
from parley.tools import docker_image_exists, run_tool

BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TORCH_VERSION = "2.13.0"
REGISTRY_PROBE_URL = "https://registry-1.docker.io/v2/"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
EXTRA_CA_CERTIFICATES = Path("/usr/local/share/ca-certificates")


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


def extra_ca_certificates() -> list[Path]:
    """The CA certificates this machine trusts beyond the distribution's own."""
    return sorted(EXTRA_CA_CERTIFICATES.glob("**/*.crt"))


def build_local_base_image(layout: EngineLayout, name: str, progress: Progress) -> None:
    """debootstrap a minimal Debian with python3, trust this machine's extra CAs, and import it."""
    suite = name.split(":", 1)[1]
    rootfs = layout.base_rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    try:
        mirror = apt_mirror()
        progress.say(f"debootstrap {suite} from {mirror} (a few minutes)")
        run_tool(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
            what="debootstrap",
            timeout=1200,
        )
        extra_cas = extra_ca_certificates()
        for certificate in extra_cas:
            shutil.copy2(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
        run_tool(["chroot", str(rootfs), "update-ca-certificates"], what="update-ca-certificates in the base image")
        progress.say(f"trusts {len(extra_cas)} extra CA certificate(s) from {EXTRA_CA_CERTIFICATES}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["tar", "-C", str(rootfs), "-c", "."], stdout=archive, check=True)
            archive.seek(0)
            run_tool(
                ["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name],
                what="docker import",
                stdin=archive,
                timeout=600,
            )
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base_image(layout: EngineLayout, progress: Progress) -> str | None:
    """The base image to build on: None for the default (a registry is reachable), else a local one."""
    if docker_image_exists(DEFAULT_BASE_IMAGE):
        progress.say(f"{DEFAULT_BASE_IMAGE} is present: builds use it")
        return None
    if registry_reachable():
        progress.say(f"an image registry is reachable: builds pull {DEFAULT_BASE_IMAGE}")
        return None
    name = local_base_image_name()
    if docker_image_exists(name):
        progress.say(f"no registry reachable; reusing the local base image {name}")
        return name
    build_local_base_image(layout, name, progress)
    progress.say(f"built the local base image {name}")
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


def supply_site_files(layout: EngineLayout, progress: Progress) -> None:
    """Hand this machine's torch CPU wheel and extra CA certificates to image builds (docker/)."""
    wheels_dir, certificates_dir = layout.site_dir / "wheels", layout.site_dir / "ca-certificates"
    if not wheels_dir.is_dir():
        progress.say(f"no {wheels_dir} (not a Parley checkout?): nothing to supply")
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
        progress.say(f"torch wheel: {target}")
    if not wheels:
        progress.say("no local torch CPU wheel in pip's find-links: the LLM image uses the PyTorch CPU index")
    certificates = extra_ca_certificates()
    for certificate in certificates:
        shutil.copy2(certificate, certificates_dir / certificate.name)
    progress.say(f"extra CA certificates: {len(certificates)} into {certificates_dir}")


def write_env_file(layout: EngineLayout, base_image: str | None, progress: Progress) -> None:
    lines = ["# Written by `parley engine start`: the environment compose builds need on this machine."]
    lines.append(f"BASE_IMAGE={base_image}" if base_image else "# BASE_IMAGE: the Dockerfiles' default")
    layout.env_file.parent.mkdir(parents=True, exist_ok=True)
    layout.env_file.write_text("\n".join(lines) + "\n")
    progress.say(f"{layout.env_file}" + (f": BASE_IMAGE={base_image}" if base_image else ""))
