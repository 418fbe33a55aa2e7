"""`parley export` / `parley import` without a Docker engine: the bundle's files, manifest and
compose.yml, and the checks `import` makes before it loads anything, on real files (a copy of the
bundle with a GGUF model of its own) and the real Compose validator.

The images are the one thing faked here: `docker save` is replaced by a function that writes a
small real tar, and `docker load` by one that records what it was asked to load (the point is
whether it is asked at all). The real round trip (export, wipe the images, import, answer Paris)
runs in make test-docker: tests/docker/test_bundle_in_docker.py.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from parley.bundle import BundleError, export_distribution, import_bundle, plan_export
from parley.tools import compose_binary
from parley.cli import cli
from parley.repo import Repo

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST = "universal_prompted_assistant"
PROJECT = "demo"
TINY = "transformers-lm-tiny"
MODEL_IN_BUNDLE = f"models/{TINY}/tiny-chat.gguf"
BUNDLE = [".env", "docker-compose.yml", "components.tsv", "MODELS.md", "components", "assistant_dists", "common", "services", "skills"]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's bundle with a second LLM whose GGUF file lives in the checkout."""
    import gguf

    root = tmp_path / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in BUNDLE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    model = root / "models" / "tiny-chat.gguf"
    model.parent.mkdir()
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_context_length(2048)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(cli, ["add-llm", TINY, "--model", "./models/tiny-chat.gguf", "--port", "8190", "--repo", str(root)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def fake_docker_save(images: list[str], path: Path) -> None:
    """A small real tar standing in for `docker save` (its `repositories` file names the images)."""
    with tarfile.open(path, "w") as archive:
        data = ("\n".join(images) + "\n").encode()
        info = tarfile.TarInfo("repositories")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


class RecordingLoader:
    def __init__(self):
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> list[str]:
        self.calls.append(path)
        return ["loaded"]


@pytest.fixture
def bundle(checkout: Path, tmp_path: Path) -> Path:
    output = tmp_path / "out" / "bundle.tar"
    export_distribution(Repo(checkout), DIST, output, ("cpu.yml",), PROJECT, lambda line: None, fake_docker_save)
    return output


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def rewrite_member(bundle: Path, name: str, change) -> None:
    """The bundle with one member's bytes changed (as a bad copy or a tampering would)."""
    files = members(bundle)
    files[name] = change(files[name])
    with tarfile.open(bundle, "w") as archive:
        for member_name, data in files.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_the_manifest_holds_the_sha256_of_every_file_computed_from_the_file(bundle: Path, checkout: Path):
    import json

    files = members(bundle)
    manifest = json.loads(files["manifest.json"])

    assert set(manifest["files"]) == set(files) - {"manifest.json", "SHA256SUMS"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}, name
    assert files["SHA256SUMS"].decode().splitlines() == [f"{e['sha256']}  {name}" for name, e in manifest["files"].items()]
    assert sorted(manifest["images"]) == [f"{PROJECT}-agent", f"{PROJECT}-prompted-skill", f"{PROJECT}-transformers-lm-smollm2", f"{PROJECT}-{TINY}"]


def test_the_bundle_carries_the_images_the_model_file_the_cards_and_the_env_file(bundle: Path, checkout: Path):
    files = members(bundle)

    assert files[MODEL_IN_BUNDLE] == (checkout / "models" / "tiny-chat.gguf").read_bytes()
    assert {f"components/{name}.yml" for name in ("agent", "prompted-skill", TINY, "transformers-lm-smollm2")} <= set(files)
    assert files[".env"] == (checkout / ".env").read_bytes()
    assert b"repositories" in files["images/images.tar"]


def test_the_bundles_compose_file_runs_the_carried_images_and_the_model_is_checked_against_its_sha256(bundle: Path):
    files = members(bundle)
    services = YAML(typ="safe").load(files["compose.yml"])["services"]

    assert all("build" not in service and service["pull_policy"] == "never" for service in services.values())
    assert services["agent"]["image"] == f"{PROJECT}-agent"
    assert services["agent"]["ports"] == ["${PARLEY_AGENT_ADDRESS:-127.0.0.1}:${PARLEY_AGENT_PORT:-4242}:4242"]
    tiny = services[TINY]
    assert [(v["source"], v["target"]) for v in tiny["volumes"]] == [(f"./{MODEL_IN_BUNDLE}", "/models/transformers-lm-tiny/tiny-chat.gguf")]
    assert tiny["environment"]["MODEL_SHA256"] == hashlib.sha256(files[MODEL_IN_BUNDLE]).hexdigest()


def test_import_verifies_every_file_then_loads_the_images_and_gives_the_compose_command(bundle: Path, tmp_path: Path):
    loader = RecordingLoader()

    imported = import_bundle(bundle, tmp_path / "site", loader, lambda line: None)

    assert loader.calls == [tmp_path / "site" / "images" / "images.tar"]
    assert imported.command == f"docker compose -p {PROJECT} --project-directory {tmp_path / 'site'} -f {tmp_path / 'site' / 'compose.yml'} up -d --wait"
    validated = subprocess.run([compose_binary(), "--project-directory", str(tmp_path / "site"), "-f", "compose.yml", "config", "-q"],
                               cwd=tmp_path / "site", capture_output=True, text=True, timeout=60)
    assert validated.returncode == 0, validated.stderr


def test_a_corrupted_file_is_named_and_nothing_is_loaded_or_left(bundle: Path, tmp_path: Path):
    rewrite_member(bundle, MODEL_IN_BUNDLE, flip_last_byte)
    loader = RecordingLoader()

    with pytest.raises(BundleError) as refused:
        import_bundle(bundle, tmp_path / "site", loader, lambda line: None)

    assert f"{MODEL_IN_BUNDLE}: sha256 " in str(refused.value) and "nothing was loaded" in str(refused.value)
    assert "images/images.tar" not in str(refused.value)
    assert loader.calls == []
    assert not (tmp_path / "site").exists() and not (tmp_path / "site.partial").exists()


def test_a_file_that_is_missing_or_not_in_the_manifest_is_named(bundle: Path, tmp_path: Path):
    files = members(bundle)
    files["components/smuggled.yml"] = files.pop("components/agent.yml")
    with tarfile.open(bundle, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    loader = RecordingLoader()

    with pytest.raises(BundleError) as refused:
        import_bundle(bundle, tmp_path / "site", loader, lambda line: None)

    assert "components/agent.yml: missing from the bundle" in str(refused.value)
    assert "components/smuggled.yml: in the bundle but not in its manifest" in str(refused.value)
    assert loader.calls == []


def test_the_import_command_names_the_corrupted_file_and_exits_1(bundle: Path, tmp_path: Path):
    rewrite_member(bundle, "components/agent.yml", lambda data: data + b"# changed\n")

    result = CliRunner().invoke(cli, ["import", str(bundle), "--directory", str(tmp_path / "site")])

    assert result.exit_code == 1
    assert "components/agent.yml: sha256 " in result.output and "nothing was loaded" in result.output
    assert "docker load" not in result.output


def test_import_into_a_folder_that_holds_something_is_refused(bundle: Path, tmp_path: Path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mine.txt").write_text("keep me")

    with pytest.raises(BundleError, match="exists and is not empty"):
        import_bundle(bundle, tmp_path / "site", RecordingLoader(), lambda line: None)
    assert (tmp_path / "site" / "mine.txt").read_text() == "keep me"


def test_a_file_that_is_not_a_bundle_is_refused(tmp_path: Path):
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as archive:
        archive.add(__file__, arcname="readme.txt")

    with pytest.raises(BundleError, match="no manifest.json: not a bundle that `parley export` wrote"):
        import_bundle(other, tmp_path / "site", RecordingLoader(), lambda line: None)


def test_dev_yml_does_not_travel_in_a_bundle(checkout: Path):
    with pytest.raises(BundleError, match="dev.yml .*does not travel in a bundle"):
        plan_export(Repo(checkout), DIST, ("dev.yml",), PROJECT)


def test_the_postgres_overlay_travels_with_its_database_image_and_volume(checkout: Path):
    plan = plan_export(Repo(checkout), DIST, ("cpu.yml", "postgres.yml"), PROJECT)

    assert f"{PROJECT}-postgres" in plan.images
    assert plan.compose["services"]["agent"]["environment"]["STATE_URL"] == "postgresql://parley:${PARLEY_POSTGRES_PASSWORD:-parley}@postgres:5432/parley"
    assert "postgres-data" in plan.compose["volumes"]
    assert "components/postgres.yml" in plan.files
