"""An offline install for real: `parley export` on this engine's built images, the images wiped,
`parley import` of the bundle (every file checked, the images loaded, a new API key written for the
site: the checkout's own key never travels), and the printed `docker compose` command run as it is:
the imported distribution refuses a turn without the site's key and answers "Paris" with it, with its dialogs in the
bundle's PostgreSQL (the postgres.yml overlay, exported with cpu.yml).

Run by `make test-docker` as root, after tests/docker/test_distribution_in_docker.py (whose engine
fixture it uses: the engine is started when none runs and stopped after). The images are built
under a compose project of this test's own (from the build cache the other test filled); their
other tags are put back after the wipe, and everything this test made (containers, volumes, the
bundle, its folder, this project's tags) is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from support.servers import free_port

from parley.api_keys import read_keys
from test_distribution_in_docker import DIST, OUTPUT_DIR, REPO_ROOT, api_key, engine, run, step, wait_until_healthy  # noqa: F401

PROJECT = "parley-test-bundle"
OVERLAYS = ("cpu.yml", "postgres.yml")
PARLEY = str(Path(sys.executable).parent / "parley")


def compose_build_command() -> list[str]:
    files = ["docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml", *(f"assistant_dists/{DIST}/{o}" for o in OVERLAYS)]
    return ["docker", "compose", "--project-name", PROJECT, *(a for f in files for a in ("-f", f)), "--progress", "plain", "build"]


def image_tags(image: str) -> list[str]:
    found = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoTags}}", image], capture_output=True, text=True)
    return json.loads(found.stdout) if found.returncode == 0 else []


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def built(engine: dict[str, str]) -> Iterator[dict[str, str]]:
    with step(f"build the {DIST} images with {' and '.join(OVERLAYS)} (project {PROJECT})"):
        run(compose_build_command(), engine, "docker-bundle-build.log")
    yield engine


def test_an_exported_bundle_imported_after_wiping_the_images_answers_paris_from_postgres(built: dict[str, str], workspace: Path,
                                                                                        api_key: str):
    environment = built
    bundle, folder = workspace / "parley-bundle.tar", workspace / "site"
    images = [f"{PROJECT}-{name}" for name in ("agent", "prompted-skill", "transformers-lm-smollm2", "postgres")]
    other_tags = {image: [tag for tag in image_tags(image) if not tag.startswith(PROJECT)] for image in images}
    agent_port = free_port()
    compose_environment = {**environment, "PARLEY_AGENT_PORT": str(agent_port)}
    imported_compose: list[str] = []
    try:
        with step("parley export (docker save, model files, cards, sha256 manifest)"):
            exported = run([PARLEY, "export", DIST, "--project", PROJECT, *(a for o in OVERLAYS for a in ("--overlay", o)), "-o", str(bundle)],
                           environment, "docker-bundle.log")
            print("\n".join("    " + line for line in exported.splitlines()[-3:]))
            packed = subprocess.run(["tar", "-tf", str(bundle)], capture_output=True, text=True, check=True).stdout.split()
        with step("wipe the images (every tag of them)"):
            for image in images:
                for tag in image_tags(image):
                    run(["docker", "image", "rm", tag], environment)
            assert not any(image_exists(image) for image in images)
        with step("parley import (verify every sha256, docker load)"):
            started = time.monotonic()
            imported = run([PARLEY, "import", str(bundle), "--directory", str(folder)], environment, "docker-bundle.log")
            print("\n".join("    " + line for line in imported.splitlines() if "loaded" in line or "verified" in line))
            print(f"    import took {time.monotonic() - started:.1f}s")
        command = imported.strip().splitlines()[-1].strip()
        assert command.startswith(f"docker compose -p {PROJECT} ") and command.endswith(" up -d --wait")
        imported_compose = shlex.split(command)[:-3]
        assert all(image_exists(image) for image in images)
        with step(f"run the printed command (agent on 127.0.0.1:{agent_port})"):
            run([*shlex.split(command), "--wait-timeout", "300"], compose_environment, "docker-bundle.log")
            wait_until_healthy(f"http://127.0.0.1:{agent_port}/health")
        with step("ask the imported distribution, with the site's own key (import wrote it)"):
            site_key = read_keys(folder)[0]
            refused = requests.post(f"http://127.0.0.1:{agent_port}/", json={"user_id": "offline", "payload": "Hi"}, timeout=30)
            answer = requests.post(f"http://127.0.0.1:{agent_port}/", headers={"Authorization": f"Bearer {site_key}"},
                                   json={"user_id": "offline", "payload": "What is the capital of France?"}, timeout=180).json()
            print(f"    agent answered: {answer['response']!r}")
            stored = run([*imported_compose, "exec", "-T", "postgres", "psql", "-U", "parley", "-d", "parley", "-tAc",
                          f"SELECT count(*) FROM utterances WHERE dialog_id = '{answer['dialog_id']}'"],
                         compose_environment)
    finally:
        with step("down -v, the bundle, its folder and this test's tags (other tags put back)"):
            if imported_compose:
                with open(OUTPUT_DIR / "docker-bundle-services.log", "w") as log:
                    subprocess.run([*imported_compose, "logs", "--no-color"], env=compose_environment, stdout=log, stderr=subprocess.STDOUT)
                subprocess.run([*imported_compose, "down", "-v", "--remove-orphans"], env=compose_environment, capture_output=True)
            for image, tags in other_tags.items():
                for tag in tags:
                    if image_exists(image) and not image_exists(tag):
                        subprocess.run(["docker", "tag", image, tag], capture_output=True)
                subprocess.run(["docker", "image", "rm", image], capture_output=True)
            bundle.unlink(missing_ok=True)
            subprocess.run(["rm", "-rf", str(folder)], check=False)
            left = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format", "{{.Names}}"],
                                  capture_output=True, text=True).stdout.split()
            print(f"    containers left of {PROJECT}: {left or 'none'}")

    assert (REPO_ROOT / ".env_secret").is_file() and not any(name.endswith(".env_secret") for name in packed)  # keys stay home
    assert refused.status_code == 401
    assert "Paris" in answer["response"]
    assert stored.strip().splitlines()[-1] == "2"  # the question and the answer, in the bundle's PostgreSQL
    assert left == []
