"""`parley export` / `parley import`: a distribution as one tar file, for a machine that has only Docker.

A bundle holds what the distribution runs and nothing to build: its images (`docker save`, one
`images/images.tar`, so layers the images share are stored once), the model files its LLM services
mount, its cards, its `.env`, and `compose.yml`, the distribution's compose files merged (Compose's
own `config`, variables left for the importing machine) with every `build:` replaced by the image
the bundle carries and the agent's port published on 127.0.0.1. `manifest.json` lists every other
file with its size and its sha256, computed from the file as it was written into the bundle
(`SHA256SUMS` repeats them for `sha256sum -c`). A service whose model file travels in the bundle
gets MODEL_SHA256 from that digest, so it verifies its model at start as it always does.

`import` extracts into a folder of its own, checks every file against the manifest before anything
else (a file that does not match, is missing or is not listed is named, the folder removed and
nothing loaded), then `docker load`s the images and prints the `docker compose` command that runs it.

The API keys (`.env_secret`) never travel: `import` writes the site a new random key into the
folder's own `.env_secret`, which the services read as they do in a checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from common.model_sources import file_sha256
from parley.api_keys import SECRET_FILE, write_key_file
from parley.cards import Card
from parley.repo import Repo
from parley.stack import StackError, compose_files
from parley.tools import docker_image_exists, run_compose
from parley.yamlio import dump_yaml

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
IMAGES = "images/images.tar"
COMPOSE = "compose.yml"
ENV_FILE = ".env"
DEFAULT_PROJECT = "parley"
# The agent's port on the importing machine: 127.0.0.1 and the card's port unless these are set.
AGENT_ADDRESS = "${PARLEY_AGENT_ADDRESS:-127.0.0.1}"
AGENT_PORT = "PARLEY_AGENT_PORT"
# Keys of a merged service that name what only a checkout has.
BUILD_ONLY_KEYS = ("build", "develop")

Echo = Callable[[str], None]


class BundleError(ValueError):
    """A bundle that cannot be made or used; the message says what and how to fix it."""


@dataclass
class ExportPlan:
    """What a bundle will hold: the compose document, the images, and files to copy (bundle path -> source)."""

    dist: str
    project: str
    compose_files: list[str]
    compose: dict[str, Any]
    images: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    # LLM services whose single model file travels: service -> bundle path of that file.
    model_files: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    dist: str
    project: str
    created: str
    compose_files: list[str]
    images: list[str]
    files: dict[str, dict[str, Any]]  # bundle path -> {"sha256", "bytes"}
    format: int = BUNDLE_FORMAT

    def to_json(self) -> str:
        return json.dumps(
            {"format": self.format, "dist": self.dist, "project": self.project, "created": self.created,
             "compose_files": self.compose_files, "images": self.images, "files": self.files}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != BUNDLE_FORMAT:
                raise BundleError(f"{MANIFEST}: format {data.get('format')!r}; this parley reads format {BUNDLE_FORMAT}")
            files = data["files"]
            unsafe = [path for path in files if Path(path).is_absolute() or ".." in Path(path).parts or path in (MANIFEST, CHECKSUMS)]
            if unsafe:
                raise BundleError(f"{MANIFEST}: paths outside the bundle or of its own files: {', '.join(unsafe)}")
            if not isinstance(files, dict) or not all(
                isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64 for entry in files.values()
            ):
                raise BundleError(f"{MANIFEST}: files must map each path to its sha256 and bytes")
            return cls(dist=str(data["dist"]), project=str(data["project"]), created=str(data["created"]),
                       compose_files=list(data["compose_files"]), images=list(data["images"]), files=files)
        except (ValueError, KeyError, TypeError) as error:
            if isinstance(error, BundleError):
                raise
            raise BundleError(f"{MANIFEST}: not a Parley bundle manifest ({type(error).__name__}: {error})") from None


def size_text(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


# --- export ------------------------------------------------------------------------------------------


def merged_compose_as_written(repo: Repo, files: list[str], project: str) -> dict[str, Any]:
    """The files merged by Compose with variables and relative paths left as written (`${...}` stays
    for the importing machine's .env and shell)."""
    result = run_compose(repo.root, files, ["config", "--format", "json", "--no-interpolate", "--no-path-resolution"],
                         project=project)
    if result.returncode != 0:
        raise BundleError(f"docker compose -f {' -f '.join(files)} config failed: {' '.join(result.stderr.split())}")
    return json.loads(result.stdout)


def _environment_map(environment: Any) -> dict[str, Any]:
    if isinstance(environment, list):
        return dict(str(item).partition("=")[::2] for item in environment)
    return dict(environment or {})


def plan_export(repo: Repo, dist: str, overlays: tuple[str, ...], project: str) -> ExportPlan:
    """What the bundle of `dist` (with `overlays`) holds; BundleError for what cannot travel."""
    cards = repo.load_valid_cards()
    try:
        files = compose_files(repo, dist, overlays)
    except StackError as error:
        raise BundleError(str(error).replace("to a swarm", "in a bundle")) from None
    merged = merged_compose_as_written(repo, files, project)
    plan = ExportPlan(dist=dist, project=project, compose_files=files, compose={}, images=[])
    services: dict[str, Any] = {}
    for name, service in (merged.get("services") or {}).items():
        card = cards.get(name)
        if card is None:
            raise BundleError(f"compose service {name!r} has no card components/{name}.yml; every service needs one")
        services[name] = _bundle_service(repo, name, dict(service), card, project, plan)
        plan.files[f"components/{name}.yml"] = repo.card_path(name)
    plan.compose = {"services": services}
    volumes = {name: {k: v for k, v in (volume or {}).items() if k in ("driver", "driver_opts", "labels", "external")}
               for name, volume in (merged.get("volumes") or {}).items()}
    if volumes:
        plan.compose["volumes"] = volumes
    if repo.path(ENV_FILE).is_file():  # compose reads it for ${...} in compose.yml
        plan.files[ENV_FILE] = repo.path(ENV_FILE)
    return plan


def _bundle_service(repo: Repo, name: str, service: dict[str, Any], card: Card, project: str, plan: ExportPlan) -> dict[str, Any]:
    if "build" in service:
        image = service.get("image") or f"{project}-{name}"
    elif service.get("image"):
        image = service["image"]
    else:
        raise BundleError(f"service {name!r} has neither image nor build")
    if image not in plan.images:
        plan.images.append(image)
    result = {key: value for key, value in service.items() if key not in BUILD_ONLY_KEYS}
    result["image"] = image
    result["pull_policy"] = "never"  # the bundle's images are loaded; nothing is fetched
    if "environment" in result:
        result["environment"] = _environment_map(result["environment"])
    for entry in result.get("env_file") or []:  # each env file travels, at the same relative path
        relative = str(entry["path"] if isinstance(entry, dict) else entry)
        required = not isinstance(entry, dict) or entry.get("required", True)
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise BundleError(f"service {name!r}: env_file {relative} is outside the checkout; only files inside it travel")
        if Path(relative).as_posix() == SECRET_FILE:
            continue  # this machine's keys stay here; the site gets its own at import
        if repo.path(relative).is_file():
            plan.files[Path(relative).as_posix()] = repo.path(relative)
        elif required:
            raise BundleError(f"service {name!r}: env_file {relative} does not exist")
    mounts = []
    for mount in result.get("volumes") or []:
        if mount.get("type") != "bind":
            mounts.append(mount)
            continue
        if not card.kind.mounts_model_files:
            raise BundleError(f"service {name!r} mounts {mount.get('source')} from this machine: only an LLM's model files travel "
                              "in a bundle (dev.yml's source folders do not: leave it out)")
        mounts.append({**mount, "source": "./" + _add_model(repo, name, Path(str(mount["source"])), plan)})
    if mounts:
        result["volumes"] = mounts
    if card.is_agent:
        published = f"{AGENT_ADDRESS}:${{{AGENT_PORT}:-{card.port}}}"
        result["ports"] = [f"{published}:{card.port}"]
    return result


def _add_model(repo: Repo, service: str, source: Path, plan: ExportPlan) -> str:
    """Add a mounted model file or folder to the plan; its path in the bundle."""
    path = source if source.is_absolute() else repo.root / source
    if not path.exists():
        raise BundleError(f"service {service!r} mounts {source}, which does not exist on this machine")
    target = f"models/{service}/{path.name}"
    if path.is_file():
        plan.files[target] = path
        plan.model_files[service] = target
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            plan.files[f"{target}/{file.relative_to(path).as_posix()}"] = file
    return target


def write_bundle(plan: ExportPlan, output: Path, save_images: Callable[[list[str], Path], None], echo: Echo) -> Manifest:
    """Write the bundle tar: images saved, files copied, each file's sha256 computed from its copy."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".parley-export-", dir=output.parent))
    try:
        images_path = staging / IMAGES
        images_path.parent.mkdir(parents=True)
        echo(f"==> docker save {' '.join(plan.images)}")
        save_images(plan.images, images_path)
        for relative, source in plan.files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        echo(f"==> sha256 of {len(plan.files) + 2} files ({size_text(sum(p.stat().st_size for p in staging.rglob('*') if p.is_file()))})")
        digests = {relative: file_sha256(staging / relative) for relative in [IMAGES, *plan.files]}
        for service, relative in plan.model_files.items():
            environment = plan.compose["services"][service].setdefault("environment", {})
            if not environment.get("MODEL_SHA256"):
                environment["MODEL_SHA256"] = digests[relative]  # the service checks its model against it at start
        header = (f"# The {plan.dist} distribution as `parley export` bundled it (from {', '.join(plan.compose_files)}):\n"
                  "# images from the bundle (docker load), nothing built or pulled. Run it with the command `parley import` prints.\n")
        (staging / COMPOSE).write_text(header + dump_yaml(plan.compose))
        digests[COMPOSE] = file_sha256(staging / COMPOSE)
        manifest = Manifest(
            dist=plan.dist, project=plan.project, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            compose_files=plan.compose_files, images=plan.images,
            files={relative: {"sha256": digest, "bytes": (staging / relative).stat().st_size} for relative, digest in sorted(digests.items())},
        )
        (staging / MANIFEST).write_text(manifest.to_json())
        (staging / CHECKSUMS).write_text("".join(f"{entry['sha256']}  {relative}\n" for relative, entry in manifest.files.items()))
        echo(f"==> writing {output.name} ({size_text(sum(entry['bytes'] for entry in manifest.files.values()))})")
        partial = output.with_name(output.name + ".partial")
        with tarfile.open(partial, "w") as bundle:
            for relative in [MANIFEST, CHECKSUMS, *manifest.files]:
                bundle.add(staging / relative, arcname=relative, recursive=False)
        partial.replace(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def docker_save(images: list[str], path: Path, echo: Echo) -> None:
    """`docker save` the images into one tar, printing how much is written while it runs."""
    missing = [image for image in images if not docker_image_exists(image)]
    if missing:
        raise BundleError(f"no local image {', '.join(missing)}: build the distribution first "
                          "(docker compose -p PROJECT -f docker-compose.yml -f ... build), with the same --project and overlays")
    _run_with_progress(["docker", "save", "-o", str(path), *images],
                       lambda: f"docker save: {size_text(path.stat().st_size if path.exists() else 0)} written", echo)


def _run_with_progress(command: list[str], progress: Callable[[], str], echo: Echo, every_seconds: float = 5.0) -> str:
    """Run a command, echoing `progress()` every few seconds while it runs; its output, or BundleError."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    started = time.monotonic()
    while process.poll() is None:
        time.sleep(0.2)
        if time.monotonic() - started >= every_seconds:
            started = time.monotonic()
            echo(f"    {progress()}")
    reader.join(timeout=10)
    if process.returncode != 0:
        tail = "".join(output[-10:]).strip()
        raise BundleError(f"`{' '.join(command[:3])} ...` failed ({process.returncode}): {tail}")
    return "".join(output)


def export_distribution(repo: Repo, dist: str, output: Path, overlays: tuple[str, ...], project: str,
                        echo: Echo, save_images: Callable[[list[str], Path], None] | None = None) -> Manifest:
    plan = plan_export(repo, dist, overlays, project)
    return write_bundle(plan, output, save_images or (lambda images, path: docker_save(images, path, echo)), echo)


# --- import ------------------------------------------------------------------------------------------


@dataclass
class Imported:
    manifest: Manifest
    folder: Path
    loaded: list[str]

    @property
    def command(self) -> str:
        return (f"docker compose -p {self.manifest.project} --project-directory {self.folder} "
                f"-f {self.folder / COMPOSE} up -d --wait")


def read_manifest(bundle_path: Path) -> Manifest:
    try:
        with tarfile.open(bundle_path) as bundle:
            member = bundle.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            return Manifest.from_json(member.read().decode())
    except KeyError:
        raise BundleError(f"{bundle_path}: no {MANIFEST}: not a bundle that `parley export` wrote") from None
    except (tarfile.TarError, OSError) as error:
        raise BundleError(f"{bundle_path}: not a readable tar file ({error})") from None


def verify_folder(folder: Path, manifest: Manifest, echo: Echo) -> list[str]:
    """One line per file that does not match the manifest (sha256, missing, or not listed)."""
    problems = []
    for relative, entry in manifest.files.items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative}: missing from the bundle")
            continue
        if entry.get("bytes", 0) >= 100_000_000:
            echo(f"    sha256 of {relative} ({size_text(entry['bytes'])})")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            problems.append(f"{relative}: sha256 {actual}, the manifest says {entry['sha256']}")
    listed = set(manifest.files) | {MANIFEST, CHECKSUMS}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative not in listed:
            problems.append(f"{relative}: in the bundle but not in its manifest")
    return problems


def import_bundle(bundle_path: Path, folder: Path, load_images: Callable[[Path], list[str]], echo: Echo) -> Imported:
    """Extract, verify every file, then load the images; BundleError (nothing loaded) on any mismatch."""
    manifest = read_manifest(bundle_path)
    folder = folder.resolve()
    if folder.exists() and any(folder.iterdir()):
        raise BundleError(f"{folder} exists and is not empty: remove it or import into another folder (--directory)")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        echo(f"==> extracting {bundle_path.name} ({size_text(bundle_path.stat().st_size)}) into {partial}")
        with tarfile.open(bundle_path) as bundle:
            bundle.extractall(partial, filter="data")  # no links, devices or paths outside the folder
        echo(f"==> verifying {len(manifest.files)} files against {MANIFEST}")
        problems = verify_folder(partial, manifest, echo)
        if problems:
            raise BundleError("the bundle does not match its manifest; nothing was loaded:\n" + "\n".join(problems))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        folder.rmdir()
    partial.replace(folder)
    key_file = write_key_file(folder)
    echo(f"==> a new API key for this site in {key_file} (mode 600): every route but /health and /ping needs it")
    echo(f"==> docker load {IMAGES} ({size_text((folder / IMAGES).stat().st_size)})")
    loaded = load_images(folder / IMAGES)
    return Imported(manifest, folder, loaded)


def docker_load(path: Path, echo: Echo) -> list[str]:
    """`docker load` the images tar; the names it loaded."""
    started = time.monotonic()
    output = _run_with_progress(["docker", "load", "-i", str(path)],
                                lambda: f"docker load: still loading after {time.monotonic() - started:.0f}s", echo, every_seconds=10)
    loaded = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Loaded image")]
    for name in loaded:
        echo(f"    loaded {name}")
    return loaded
